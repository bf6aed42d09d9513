-- +goose Up
CREATE TABLE ex_goose_items (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL);

-- +goose Down
DROP TABLE ex_goose_items;
