-- +goose Up
ALTER TABLE ex_goose_items ADD COLUMN price INT NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE ex_goose_items DROP COLUMN price;
