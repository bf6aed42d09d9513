ALTER TABLE ex_migrate_items DROP COLUMN price;
