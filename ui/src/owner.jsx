import { useState } from "preact/hooks";
import { DailyChart, METRICS } from "./chart.jsx";
import { Empty, ErrorBox, Loading, Section, Stat, Table, useLoad } from "./components.jsx";
import { addDays, credits, day, int, ms, time } from "./format.js";

function limitText(rule) {
  const parts = [];
  if (rule.rpm) parts.push(`${int(rule.rpm)} requests/min`);
  if (rule.tpm) parts.push(`${int(rule.tpm)} tokens/min`);
  if (rule.concurrency) parts.push(`${int(rule.concurrency)} at once`);
  if (rule.daily_credits)
    parts.push(`${credits(rule.daily_credits)} credits/day (${credits(rule.daily_credits_spent)} spent today)`);
  if (rule.monthly_credits)
    parts.push(`${credits(rule.monthly_credits)} credits/month (${credits(rule.monthly_credits_spent)} spent)`);
  const text = parts.join(", ") || "none";
  // The config file's defaults (limits.default_key / default_owner) are changed only there.
  return rule.source === "config" ? `${text} (config default)` : text;
}

function keyState(key) {
  if (key.revoke_time) return "revoked";
  if (key.expire_time && Date.parse(key.expire_time) < Date.now()) return "expired";
  return "active";
}

export function Overview({ source, adminHint }) {
  const { data, error, loading } = useLoad(() => source.account(), [source]);
  if (loading) return <Loading what="the account" />;
  if (error) return <ErrorBox error={error} />;
  if (!data) return <Empty>{adminHint || "Nothing to show."}</Empty>;
  const balance = data.balance || {};
  const keysById = Object.fromEntries((data.keys || []).map((k) => [k.id, k]));
  return (
    <>
      <Section title="Balance" id="balance-title">
        <div class="stats">
          <Stat label="Balance (credits)" value={credits(balance.balance)} testid="balance" />
          <Stat label="Reserved (calls in flight, credit blocks)" value={credits(balance.reserved)} testid="reserved" />
          <Stat label="Available for new calls" value={credits(balance.available)} testid="available" />
        </div>
        {data.billing_enabled === false ? (
          <p class="note">Billing is off on this gateway: usage is recorded, nothing is charged.</p>
        ) : null}
      </Section>
      <Section title="Reservations" id="reservations-title">
        {data.reservations.length ? (
          <Table
            caption="Credits held by calls in flight and by credit blocks"
            testid="reservations"
            columns={[
              { label: "Since", render: (r) => time(r.create_time) },
              { label: "Credits", num: true, render: (r) => credits(r.amount) },
              { label: "Key", render: (r) => keysById[r.key_id]?.display || r.key_id || "—" },
              { label: "Lapses", render: (r) => time(r.expire_time) },
              // A block: credits a serving process holds for the key's next calls (given back after a few seconds unused).
              { label: "Held for", render: (r) => (r.kind === "RESERVATION_KIND_BLOCK" ? "next calls (block)" : "a call") },
            ]}
            rows={data.reservations}
          />
        ) : (
          <Empty>No credits are held right now: reservations appear while calls are in flight.</Empty>
        )}
      </Section>
      <Section title="Keys and their limits" id="keys-title">
        {data.keys.length ? (
          <Table
            caption="API keys (secrets are never shown)"
            testid="owner-keys"
            rowKey={(k) => k.id}
            columns={[
              { label: "Key", key: "display" },
              { label: "Name", key: "name" },
              { label: "State", render: keyState },
              { label: "Models", render: (k) => (k.allowed_models?.length ? k.allowed_models.join(", ") : "all") },
              { label: "Spending cap", render: (k) => (k.spend_cap ? `${credits(k.spend_cap)} credits` : "none") },
              {
                label: "Rate limits",
                render: (k) =>
                  data.limits
                    .filter((l) => l.key_id === k.id)
                    .map((l) => `${l.model}: ${limitText(l)}`)
                    .join("; ") || "none set",
              },
            ]}
            rows={data.keys}
          />
        ) : (
          <Empty>No keys yet. An administrator creates them (aigne-hub keys create, or the Keys page).</Empty>
        )}
        {data.limits.filter((l) => l.owner).map((l) => (
          <p class="note" key={`${l.model}:${l.source}`} data-testid="owner-limit">
            Limits on all keys together ({l.model}): {limitText(l)}
          </p>
        ))}
      </Section>
    </>
  );
}

function fillDays(rows, since, until, pick) {
  const byDay = {};
  for (const row of rows) byDay[row.day] = row;
  const out = [];
  for (let d = since; d < until; d = addDays(d, 1)) {
    const row = byDay[d] || {};
    out.push({ day: d, ...pick(row) });
  }
  return out;
}

function measures(row) {
  const input = Number(row.input_tokens || 0);
  const output = Number(row.output_tokens || 0);
  return {
    calls: Number(row.calls || 0),
    errors: Number(row.errors || 0),
    input,
    output,
    tokens: input + output,
    credits: Number(row.credits || 0),
  };
}

export function Usage({ source }) {
  const today = day(new Date());
  const [range, setRange] = useState({ from: addDays(today, -29), to: today });
  const [metric, setMetric] = useState("calls");
  const [draft, setDraft] = useState(range);
  const until = addDays(range.to, 1);
  const params = { since: range.from, until };
  const byDay = useLoad(() => source.usage({ ...params, group_by: ["day"] }), [source, range.from, range.to]);
  const byModel = useLoad(() => source.usage({ ...params, group_by: ["model"] }), [source, range.from, range.to]);
  const total = useLoad(() => source.usage(params), [source, range.from, range.to]);
  const [rangeError, setRangeError] = useState(null);

  function apply(event) {
    event.preventDefault();
    if (!draft.from || !draft.to || draft.from > draft.to) {
      setRangeError({ message: "choose a start day on or before the end day" });
      return;
    }
    setRangeError(null);
    setRange(draft);
  }
  function preset(days) {
    const next = { from: addDays(today, -(days - 1)), to: today };
    setDraft(next);
    setRange(next);
  }
  const totals = total.data ? measures(total.data.totals?.[0] || {}) : null;
  const days = byDay.data ? fillDays(byDay.data.totals || [], range.from, until, measures) : [];
  const models = byModel.data ? (byModel.data.totals || []).map((r) => ({ model: r.model, ...measures(r) })) : [];
  const error = byDay.error || byModel.error || total.error;
  return (
    <>
      <Section title="Date range" id="range-title">
        <form class="range" onSubmit={apply}>
          <label>
            From (UTC)
            <input
              type="date"
              name="from"
              value={draft.from}
              max={today}
              onInput={(e) => setDraft({ ...draft, from: e.currentTarget.value })}
            />
          </label>
          <label>
            To (UTC)
            <input
              type="date"
              name="to"
              value={draft.to}
              onInput={(e) => setDraft({ ...draft, to: e.currentTarget.value })}
            />
          </label>
          <button type="submit">Show</button>
          <span class="presets" role="group" aria-label="Quick ranges">
            <button type="button" class="secondary" onClick={() => preset(7)}>
              7 days
            </button>
            <button type="button" class="secondary" onClick={() => preset(30)}>
              30 days
            </button>
            <button type="button" class="secondary" onClick={() => preset(90)}>
              90 days
            </button>
          </span>
        </form>
        <ErrorBox error={rangeError} />
      </Section>
      <ErrorBox error={error} />
      {totals ? (
        <Section title={`Totals, ${range.from} to ${range.to}`} id="totals-title">
          <div class="stats" data-testid="totals">
            <Stat label="Requests" value={int(totals.calls)} testid="total-calls" />
            <Stat label="Failed" value={int(totals.errors)} testid="total-errors" />
            <Stat label="Input tokens" value={int(totals.input)} testid="total-input" />
            <Stat label="Output tokens" value={int(totals.output)} testid="total-output" />
            <Stat label="Credits" value={credits(totals.credits)} testid="total-credits" />
          </div>
          {totals.calls === 0 ? (
            <Empty>
              No calls in this range. Make one with your key (for example POST /v1/chat/completions), or widen the
              range.
            </Empty>
          ) : null}
        </Section>
      ) : null}
      {byDay.data && totals && totals.calls > 0 ? (
        <Section title="By day" id="day-title">
          <label class="metric">
            Chart shows
            <select value={metric} onChange={(e) => setMetric(e.currentTarget.value)} name="metric">
              {Object.entries(METRICS).map(([name, m]) => (
                <option value={name} key={name}>
                  {m.label}
                </option>
              ))}
            </select>
          </label>
          <DailyChart days={days} metric={metric} />
          <Table
            caption="Usage per UTC day"
            testid="usage-by-day"
            columns={[
              { label: "Day", key: "day" },
              { label: "Requests", num: true, render: (r) => int(r.calls) },
              { label: "Input tokens", num: true, render: (r) => int(r.input) },
              { label: "Output tokens", num: true, render: (r) => int(r.output) },
              { label: "Credits", num: true, render: (r) => credits(r.credits) },
            ]}
            rows={days.filter((d) => d.calls > 0)}
          />
        </Section>
      ) : null}
      {byModel.data && models.length ? (
        <Section title="By model" id="model-title">
          <Table
            caption="Usage per model"
            testid="usage-by-model"
            rowKey={(r) => r.model}
            columns={[
              { label: "Model", key: "model" },
              { label: "Requests", num: true, render: (r) => int(r.calls) },
              { label: "Failed", num: true, render: (r) => int(r.errors) },
              { label: "Input tokens", num: true, render: (r) => int(r.input) },
              { label: "Output tokens", num: true, render: (r) => int(r.output) },
              { label: "Credits", num: true, render: (r) => credits(r.credits) },
            ]}
            rows={models}
          />
        </Section>
      ) : null}
    </>
  );
}

export function Calls({ source }) {
  const [pages, setPages] = useState([""]);
  const token = pages[pages.length - 1];
  const { data, error, loading } = useLoad(() => source.calls({ page_size: 50, page_token: token }), [source, token]);
  if (loading) return <Loading what="recent calls" />;
  if (error) return <ErrorBox error={error} />;
  const calls = data.calls || [];
  return (
    <Section title="Recent calls" id="calls-title">
      {calls.length ? (
        <>
          <Table
            caption="Calls, newest first"
            testid="calls"
            rowKey={(c) => c.request_id}
            columns={[
              { label: "Time (UTC)", render: (c) => time(c.create_time).replace(" UTC", "") },
              { label: "Model", render: (c) => (c.model.startsWith(`${c.provider}/`) ? c.model : `${c.provider}/${c.model}`) },
              { label: "Kind", key: "operation" },
              {
                label: "Outcome",
                render: (c) => (
                  <span class={`badge ${c.outcome === "ok" ? "ok" : "bad"}`}>
                    {c.outcome}
                    {c.error_reason ? ` (${c.error_reason})` : ""}
                  </span>
                ),
              },
              { label: "Latency", num: true, render: (c) => ms(c.latency_ms) },
              { label: "Input tokens", num: true, render: (c) => int(c.input_tokens) },
              { label: "Output tokens", num: true, render: (c) => int(c.output_tokens) },
              { label: "Credits", num: true, render: (c) => credits(c.credits) },
            ]}
            rows={calls}
          />
          <div class="pager">
            {pages.length > 1 ? (
              <button type="button" class="secondary" onClick={() => setPages(pages.slice(0, -1))}>
                Newer calls
              </button>
            ) : null}
            {data.next_page_token ? (
              <button type="button" class="secondary" onClick={() => setPages([...pages, data.next_page_token])}>
                Older calls
              </button>
            ) : null}
          </div>
        </>
      ) : (
        <Empty>No calls yet. Calls made with this account's keys show here as soon as they finish.</Empty>
      )}
    </Section>
  );
}
