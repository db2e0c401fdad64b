-- pgbench-pg-b's transaction (capture-pgbench-skewed.sh): pgbench's built-in
-- TPC-B-like script, statement for statement, except that the account is
-- drawn from a bounded Zipf distribution (s = 1.1) over all accounts instead
-- of uniformly: account 1 is about 12% of the draws, the first 10 about a
-- third, and most of the million accounts are never drawn. Tellers and
-- branches stay uniform as in the built-in script. The statements are
-- written as the built-in ones are, so pgbench_log_to_trace.py parses them
-- unchanged. Run with -s SCALE (a custom script does not read the scale from
-- the database).
\set naccounts 100000 * :scale
\set aid random_zipfian(1, :naccounts, 1.1)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
