"""PostgreSQL: `aigne_hub_record_usage`, a batch of usage records written and its credit
reservations settled in one statement (server.accounts.ledger, billing on).

Why: the same work as SQL statements from the gateway is a transaction of six round
trips for one record (BEGIN, the credit block's row, the record, the balance, the key,
COMMIT), where a record that settles nothing is one INSERT. With billing on, a call on
PostgreSQL cost 1.44x the gateway's and the database's CPU of one with billing off at
one connection (paired A/B); nearly all of it was those round trips, on both sides.

The function does what `Ledger._write_in` does on SQLite, step for step and in the same
lock order (reservations by id, the records by request id, balances by owner, keys by
id, spend windows by id; ids compared bytewise, as Python sorts them). It is called in
autocommit: one statement, one transaction, all of it or nothing. Its statements are
planned once per connection (`plan_cache_mode`): planned per call, they took a third
of its CPU.

    Per record of the batch, in request id order (arrays of one length):
        request_ids      the record's request id, as inserted
        reservation_ids  the reservation it settles (a call's own, or a credit block), or null
        drawn            true: a draw from the credit block named
        charges          what to charge: a draw's charge; for a call's own reservation,
                         its cost (charged at most what the reservation's row holds)
    new_rows   the usage rows to insert (a batch's duplicates once), in request id
               order, as JSON objects of their columns without `id` and `credits_micros`
               (jsonb_populate_record: a column left out is NULL, not its default, so
               the ledger's `_row` names every column; a test checks it)
    row_of     per row, the record (1-based) whose row it is
    returns, per record in the same order: recorded (its row was inserted), charged
    (what it was charged), lost_block (a draw whose block's row was gone or too small).

Self-contained like r0001: no imports from the schema module. Nothing on SQLite.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

SIGNATURE = "text[], text[], boolean[], bigint[], jsonb, integer[]"
FUNCTION = r"""
CREATE OR REPLACE FUNCTION aigne_hub_record_usage(
    request_ids text[], reservation_ids text[], drawn boolean[], charges bigint[], new_rows jsonb, row_of integer[]
)
RETURNS TABLE (recorded boolean, charged bigint, lost_block boolean)
LANGUAGE plpgsql
-- Its few statements are the same on every call: planned once per connection, not per call.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n integer := coalesce(array_length(request_ids, 1), 0);
    charge bigint[] := array_fill(0::bigint, ARRAY[n]);
    held bigint[] := array_fill(0::bigint, ARRAY[n]);
    holder text[] := array_fill(NULL::text, ARRAY[n]);
    holder_key text[] := array_fill(NULL::text, ARRAY[n]);
    windows text[] := array_fill(NULL::text, ARRAY[n]);
    settles boolean[] := array_fill(false, ARRAY[n]);
    lost boolean[] := array_fill(false, ARRAY[n]);
    inserted boolean[] := array_fill(false, ARRAY[n]);
    taken_ids text[] := '{}';
    taken_owner text[] := '{}';
    taken_key text[] := '{}';
    taken_amount bigint[] := '{}';
    taken_windows text[] := '{}';
    refund_ids text[] := '{}';
    refunds bigint[] := '{}';
    inserted_ids text[];
    any_windows boolean := false;
    r record;
    h record;
    i integer;
    j integer;
BEGIN
    -- 1. The reservations, in id order: a call's own row deleted, a credit block's row
    --    shrunk by its draws (if it still holds them all).
    FOR r IN
        SELECT u.id, bool_or(u.drawn) AS drawn, coalesce(sum(u.charge) FILTER (WHERE u.drawn), 0) AS total
        FROM unnest(reservation_ids, drawn, charges) AS u(id, drawn, charge)
        WHERE u.id IS NOT NULL
        GROUP BY u.id
        ORDER BY u.id COLLATE "C"
    LOOP
        IF r.drawn THEN
            UPDATE reservations AS v SET amount_micros = v.amount_micros - r.total
            WHERE v.id = r.id AND v.amount_micros >= r.total
            RETURNING v.owner_id, v.key_id, v.amount_micros, v.spend_window_ids INTO h;
        ELSE
            DELETE FROM reservations AS v WHERE v.id = r.id
            RETURNING v.owner_id, v.key_id, v.amount_micros, v.spend_window_ids INTO h;
        END IF;
        IF FOUND THEN
            taken_ids := taken_ids || r.id;
            taken_owner := taken_owner || h.owner_id::text;
            taken_key := taken_key || h.key_id::text;
            taken_amount := taken_amount || h.amount_micros;
            taken_windows := taken_windows || h.spend_window_ids;
        END IF;
    END LOOP;

    -- 2. Each record's hold and charge, in the order given (request id order: a
    --    reservation two records name is the first one's).
    FOR i IN 1..n LOOP
        CONTINUE WHEN reservation_ids[i] IS NULL;
        j := array_position(taken_ids, reservation_ids[i]);
        IF j IS NULL THEN
            lost[i] := drawn[i];
            CONTINUE;
        END IF;
        IF drawn[i] THEN
            charge[i] := greatest(charges[i], 0);
            held[i] := charge[i];
        ELSE
            taken_ids[j] := NULL;
            held[i] := taken_amount[j];
            charge[i] := least(greatest(charges[i], 0), held[i]);
        END IF;
        settles[i] := true;
        holder[i] := taken_owner[j];
        holder_key[i] := taken_key[j];
        windows[i] := nullif(btrim(taken_windows[j]), '');
        any_windows := any_windows OR windows[i] IS NOT NULL;
    END LOOP;

    -- 3. The rows, in the order given; a request id already recorded is skipped.
    WITH added AS (
        INSERT INTO usage_records
        SELECT u.*
        FROM jsonb_array_elements(new_rows) WITH ORDINALITY AS x(value, ord),
        LATERAL jsonb_populate_record(
            NULL::usage_records,
            x.value || jsonb_build_object(
                'id', nextval('usage_records_id_seq'::regclass), 'credits_micros', charge[row_of[x.ord]])) AS u
        ORDER BY x.ord
        ON CONFLICT (request_id) DO NOTHING
        RETURNING usage_records.request_id
    )
    SELECT coalesce(array_agg(added.request_id), '{}') INTO inserted_ids FROM added;
    FOR j IN 1..coalesce(array_length(row_of, 1), 0) LOOP
        inserted[row_of[j]] := (new_rows->(j - 1)->>'request_id') = ANY(inserted_ids);
    END LOOP;

    -- 4. A record not inserted charges nothing: a draw's charge goes back to its block
    --    (not settled), a call's hold is released. Then each balance, key and spend
    --    window once.
    FOR i IN 1..n LOOP
        CONTINUE WHEN inserted[i];
        IF settles[i] AND drawn[i] THEN
            j := array_position(refund_ids, reservation_ids[i]);
            IF j IS NULL THEN
                refund_ids := refund_ids || reservation_ids[i];
                refunds := refunds || charge[i];
            ELSE
                refunds[j] := refunds[j] + charge[i];
            END IF;
            settles[i] := false;
        END IF;
        charge[i] := 0;
    END LOOP;
    IF cardinality(refund_ids) > 0 THEN
        FOR r IN SELECT u.id, u.amount FROM unnest(refund_ids, refunds) AS u(id, amount) ORDER BY u.id COLLATE "C"
        LOOP
            UPDATE reservations AS v SET amount_micros = v.amount_micros + r.amount WHERE v.id = r.id;
        END LOOP;
    END IF;
    FOR r IN
        SELECT u.owner, sum(u.charge) AS charged, sum(u.held) AS released
        FROM unnest(holder, charge, held, settles) AS u(owner, charge, held, settles)
        WHERE u.settles
        GROUP BY u.owner
        ORDER BY u.owner COLLATE "C"
    LOOP
        UPDATE balances AS b
        SET balance_micros = b.balance_micros - r.charged, reserved_micros = b.reserved_micros - r.released,
            updated_at = now() AT TIME ZONE 'UTC'
        WHERE b.owner_id = r.owner;
    END LOOP;
    FOR r IN
        SELECT u.key_id, sum(u.charge) AS charged, sum(u.held) AS released
        FROM unnest(holder_key, charge, held, settles) AS u(key_id, charge, held, settles)
        WHERE u.settles AND u.key_id IS NOT NULL
        GROUP BY u.key_id
        ORDER BY u.key_id COLLATE "C"
    LOOP
        UPDATE api_keys AS a
        SET spent_micros = a.spent_micros + r.charged, reserved_micros = a.reserved_micros - r.released
        WHERE a.id = r.key_id;
    END LOOP;
    IF any_windows THEN
        FOR r IN
            SELECT w.id, sum(u.charge) AS charged, sum(u.held) AS released
            FROM unnest(windows, charge, held, settles) AS u(ids, charge, held, settles),
            LATERAL regexp_split_to_table(u.ids, '\s+') AS w(id)
            WHERE u.settles AND u.ids IS NOT NULL
            GROUP BY w.id
            ORDER BY w.id COLLATE "C"
        LOOP
            UPDATE spend_windows AS s
            SET spent_micros = s.spent_micros + r.charged, reserved_micros = s.reserved_micros - r.released,
                updated_at = now() AT TIME ZONE 'UTC'
            WHERE s.id = r.id;
        END LOOP;
    END IF;

    RETURN QUERY SELECT u.recorded, u.charged, u.lost FROM unnest(inserted, charge, lost) AS u(recorded, charged, lost);
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS aigne_hub_record_usage({SIGNATURE})")
