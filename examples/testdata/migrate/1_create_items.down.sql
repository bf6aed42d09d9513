DROP TABLE ex_migrate_items;
