import { useMemo, useState } from "preact/hooks";
import { adminSource, call } from "./api.js";
import { Done, Empty, ErrorBox, Loading, Section, Table, useAction, useLoad } from "./components.jsx";
import { credits, int, time } from "./format.js";
import { Calls, Overview, Usage } from "./owner.jsx";

// Owner filter shared by the admin's account, usage and calls pages.
export function OwnerPicker({ token, owner, setOwner, allowAll }) {
  const owners = useLoad(() => call(token, "GET", "/admin/keys", { params: { page_size: 1000 } }), [token]);
  const [draft, setDraft] = useState(owner);
  const known = [...new Set((owners.data?.keys || []).map((k) => k.owner))].sort();
  return (
    <form
      class="range"
      onSubmit={(e) => {
        e.preventDefault();
        setOwner(draft.trim());
      }}
    >
      <label>
        Owner
        <input
          name="owner"
          list="known-owners"
          value={draft}
          placeholder={allowAll ? "all owners" : "user:alice"}
          onInput={(e) => setDraft(e.currentTarget.value)}
        />
      </label>
      <datalist id="known-owners">
        {known.map((o) => (
          <option value={o} key={o} />
        ))}
      </datalist>
      <button type="submit">Show</button>
      <ErrorBox error={owners.error} />
    </form>
  );
}

export function AdminOwner({ token, page, owner, setOwner }) {
  const source = useMemo(() => adminSource(token, owner), [token, owner]);
  const allowAll = page !== "account";
  return (
    <>
      <Section title="Whose account" id="owner-title">
        <OwnerPicker token={token} owner={owner} setOwner={setOwner} allowAll={allowAll} />
      </Section>
      {page === "account" ? (
        <Overview source={source} adminHint="Choose an owner (user:NAME or project:NAME) to see its balance, keys and limits." />
      ) : null}
      {page === "usage" ? <Usage source={source} /> : null}
      {page === "calls" ? <Calls source={source} /> : null}
    </>
  );
}

function splitList(text) {
  return text
    .split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

function optionalInt(text) {
  return text.trim() === "" ? undefined : Number(text);
}

export function Keys({ token }) {
  const list = useLoad(() => call(token, "GET", "/admin/keys", { params: { page_size: 1000 } }), [token]);
  const create = useAction();
  const revoke = useAction();
  const limits = useAction();
  const [secret, setSecret] = useState(null);
  const [form, setForm] = useState({ owner: "", name: "", models: "", cap: "" });
  const [limit, setLimit] = useState({
    key_id: "",
    model: "",
    rpm: "",
    tpm: "",
    concurrency: "",
    daily_credits: "",
    monthly_credits: "",
  });

  async function onCreate(event) {
    event.preventDefault();
    const body = { owner: form.owner.trim(), name: form.name.trim() };
    const models = splitList(form.models);
    if (models.length) body.allowed_models = models;
    if (form.cap.trim()) body.spend_cap = form.cap.trim();
    const created = await create.run(
      () => call(token, "POST", "/admin/keys", { body }),
      (r) => `Created ${r.key.display} for ${r.key.owner}.`,
    );
    if (created) {
      setSecret(created.secret);
      list.reload();
    }
  }
  async function onRevoke(key) {
    if (!window.confirm(`Revoke ${key.display} (${key.name})? Calls with it are refused at once.`)) return;
    const done = await revoke.run(
      () => call(token, "POST", `/admin/keys/${encodeURIComponent(key.id)}:revoke`, { body: {} }),
      () => `Revoked ${key.display}.`,
    );
    if (done) list.reload();
  }
  async function onLimit(event) {
    event.preventDefault();
    const rule = { key_id: limit.key_id, model: limit.model.trim() || "*" };
    for (const name of ["rpm", "tpm", "concurrency"]) {
      const value = optionalInt(limit[name]);
      if (value !== undefined) rule[name] = value;
    }
    for (const name of ["daily_credits", "monthly_credits"]) {
      if (limit[name].trim()) rule[name] = limit[name].trim();
    }
    await limits.run(
      () => call(token, "POST", "/admin/limits", { body: { limit: rule } }),
      (r) => `Limits of ${r.limit.model} set.`,
    );
  }
  const keys = list.data?.keys || [];
  return (
    <>
      <Section title="Create a key" id="create-key-title">
        <form class="grid-form" onSubmit={onCreate}>
          <label>
            Owner
            <input
              name="owner"
              required
              placeholder="user:alice"
              value={form.owner}
              onInput={(e) => setForm({ ...form, owner: e.currentTarget.value })}
            />
          </label>
          <label>
            Name
            <input
              name="name"
              required
              placeholder="laptop"
              value={form.name}
              onInput={(e) => setForm({ ...form, name: e.currentTarget.value })}
            />
          </label>
          <label>
            Allowed models (globs, optional)
            <input
              name="models"
              placeholder="openai/* anthropic/*"
              value={form.models}
              onInput={(e) => setForm({ ...form, models: e.currentTarget.value })}
            />
          </label>
          <label>
            Spending cap in credits (optional)
            <input
              name="cap"
              inputmode="decimal"
              value={form.cap}
              onInput={(e) => setForm({ ...form, cap: e.currentTarget.value })}
            />
          </label>
          <button type="submit" disabled={create.busy}>
            Create key
          </button>
        </form>
        <ErrorBox error={create.error} />
        <Done text={create.done} />
        {secret ? (
          <div class="secret" role="status">
            <p>
              The key's secret, shown <strong>once</strong>: copy it now.
            </p>
            <code data-testid="new-secret">{secret}</code>
            <button type="button" class="secondary" onClick={() => setSecret(null)}>
              I copied it
            </button>
          </div>
        ) : null}
      </Section>
      <Section title="Keys" id="keys-list-title">
        <ErrorBox error={list.error || revoke.error} />
        <Done text={revoke.done} />
        {list.loading ? <Loading what="keys" /> : null}
        {list.data && !keys.length ? <Empty>No keys yet: create the first one above.</Empty> : null}
        {keys.length ? (
          <Table
            caption="Every API key, oldest first"
            testid="keys"
            rowKey={(k) => k.id}
            columns={[
              { label: "Key", key: "display" },
              { label: "Owner", key: "owner" },
              { label: "Name", key: "name" },
              { label: "Models", render: (k) => (k.allowed_models?.length ? k.allowed_models.join(", ") : "all") },
              { label: "Cap", render: (k) => (k.spend_cap ? credits(k.spend_cap) : "none") },
              { label: "Created", render: (k) => time(k.create_time) },
              {
                label: "State",
                render: (k) =>
                  k.revoke_time ? (
                    <span class="badge bad">revoked</span>
                  ) : (
                    <button type="button" class="danger" onClick={() => onRevoke(k)} aria-label={`Revoke ${k.display}`}>
                      Revoke
                    </button>
                  ),
              },
            ]}
            rows={keys}
          />
        ) : null}
      </Section>
      <Section title="Rate limits of a key" id="limits-title">
        <form class="grid-form" onSubmit={onLimit}>
          <label>
            Key
            <select
              name="key_id"
              required
              value={limit.key_id}
              onChange={(e) => setLimit({ ...limit, key_id: e.currentTarget.value })}
            >
              <option value="">Choose a key</option>
              {keys
                .filter((k) => !k.revoke_time)
                .map((k) => (
                  <option value={k.id} key={k.id}>
                    {k.display} ({k.owner}, {k.name})
                  </option>
                ))}
            </select>
          </label>
          <label>
            Models (glob)
            <input name="model" placeholder="*" value={limit.model} onInput={(e) => setLimit({ ...limit, model: e.currentTarget.value })} />
          </label>
          {[
            ["rpm", "Requests per minute"],
            ["tpm", "Tokens per minute"],
            ["concurrency", "Calls at once"],
            ["daily_credits", "Credits per UTC day"],
            ["monthly_credits", "Credits per UTC month"],
          ].map(([name, label]) => (
            <label key={name}>
              {label}
              <input
                name={name}
                inputmode="numeric"
                value={limit[name]}
                onInput={(e) => setLimit({ ...limit, [name]: e.currentTarget.value })}
              />
            </label>
          ))}
          <button type="submit" disabled={limits.busy}>
            Set limits
          </button>
        </form>
        <ErrorBox error={limits.error} />
        <Done text={limits.done} />
      </Section>
    </>
  );
}

export function Credits({ token }) {
  const rates = useLoad(() => call(token, "GET", "/admin/rates", { params: { page_size: 1000 } }), [token]);
  const grant = useAction();
  const rate = useAction();
  const [form, setForm] = useState({ owner: "", amount: "", note: "" });
  const [rateForm, setRateForm] = useState({ model: "", input_per_million: "", output_per_million: "", per_image: "" });
  async function onGrant(event) {
    event.preventDefault();
    await grant.run(
      () => call(token, "POST", "/admin/credits:grant", { body: { ...form, owner: form.owner.trim() } }),
      (r) => `${r.balance.owner} now has ${credits(r.balance.balance)} credits (${credits(r.balance.available)} available).`,
    );
  }
  async function onRate(event) {
    event.preventDefault();
    const body = Object.fromEntries(Object.entries(rateForm).filter(([, v]) => v.trim() !== ""));
    const done = await rate.run(() => call(token, "POST", "/admin/rates", { body: { rate: body } }), (r) => `Rate of ${r.rate.model} set.`);
    if (done) rates.reload();
  }
  const list = rates.data?.rates || [];
  return (
    <>
      <Section title="Grant credits" id="grant-title">
        <form class="grid-form" onSubmit={onGrant}>
          <label>
            Owner
            <input name="owner" required placeholder="user:alice" value={form.owner} onInput={(e) => setForm({ ...form, owner: e.currentTarget.value })} />
          </label>
          <label>
            Credits
            <input name="amount" required inputmode="decimal" placeholder="25" value={form.amount} onInput={(e) => setForm({ ...form, amount: e.currentTarget.value })} />
          </label>
          <label>
            Note (optional)
            <input name="note" value={form.note} onInput={(e) => setForm({ ...form, note: e.currentTarget.value })} />
          </label>
          <button type="submit" disabled={grant.busy}>
            Grant
          </button>
        </form>
        <ErrorBox error={grant.error} />
        <Done text={grant.done} />
      </Section>
      <Section title="Rates" id="rates-title">
        <form class="grid-form" onSubmit={onRate}>
          <label>
            Model or glob
            <input name="model" required placeholder="openai/*" value={rateForm.model} onInput={(e) => setRateForm({ ...rateForm, model: e.currentTarget.value })} />
          </label>
          {[
            ["input_per_million", "Credits per million input tokens"],
            ["output_per_million", "Credits per million output tokens"],
            ["per_image", "Credits per image"],
          ].map(([name, label]) => (
            <label key={name}>
              {label}
              <input name={name} inputmode="decimal" value={rateForm[name]} onInput={(e) => setRateForm({ ...rateForm, [name]: e.currentTarget.value })} />
            </label>
          ))}
          <button type="submit" disabled={rate.busy}>
            Set rate
          </button>
        </form>
        <ErrorBox error={rate.error || rates.error} />
        <Done text={rate.done} />
        {rates.data && !list.length ? <Empty>No rates yet: with billing on, a model without a rate is refused. Set one above.</Empty> : null}
        {list.length ? (
          <Table
            caption="Credits per unit, by model"
            testid="rates"
            rowKey={(r) => r.model}
            columns={[
              { label: "Model", key: "model" },
              { label: "Input / M tokens", num: true, render: (r) => credits(r.input_per_million) },
              { label: "Output / M tokens", num: true, render: (r) => credits(r.output_per_million) },
              { label: "Cached input / M", num: true, render: (r) => credits(r.cached_input_per_million) },
              { label: "Image", num: true, render: (r) => credits(r.per_image) },
              { label: "Audio second", num: true, render: (r) => credits(r.per_audio_second) },
              { label: "Character", num: true, render: (r) => credits(r.per_character) },
            ]}
            rows={list}
          />
        ) : null}
      </Section>
    </>
  );
}

export function Credentials({ token }) {
  const list = useLoad(() => call(token, "GET", "/admin/credentials", { params: { page_size: 1000 } }), [token]);
  const add = useAction();
  const change = useAction();
  const [form, setForm] = useState({ provider: "", secret: "", label: "" });
  async function onAdd(event) {
    event.preventDefault();
    const done = await add.run(
      () => call(token, "POST", "/admin/credentials", { body: form }),
      (r) => `Stored ${r.credential.masked} for ${r.credential.provider}.`,
    );
    if (done) {
      setForm({ provider: form.provider, secret: "", label: "" });
      list.reload();
    }
  }
  async function onRemove(cred) {
    if (!window.confirm(`Remove ${cred.masked} (${cred.provider})?`)) return;
    const done = await change.run(
      () => call(token, "DELETE", `/admin/credentials/${encodeURIComponent(cred.id)}`),
      () => `Removed ${cred.masked}.`,
    );
    if (done) list.reload();
  }
  async function onActivate(cred) {
    const done = await change.run(
      () => call(token, "POST", `/admin/credentials/${encodeURIComponent(cred.id)}:activate`, { body: {} }),
      () => `${cred.masked} is back in rotation.`,
    );
    if (done) list.reload();
  }
  const creds = list.data?.credentials || [];
  return (
    <>
      <Section title="Add a provider credential" id="add-cred-title">
        <form class="grid-form" onSubmit={onAdd} autocomplete="off">
          <label>
            Provider
            <input name="provider" required placeholder="openai" value={form.provider} onInput={(e) => setForm({ ...form, provider: e.currentTarget.value })} />
          </label>
          <label>
            Provider's API key
            <input name="secret" type="password" required value={form.secret} onInput={(e) => setForm({ ...form, secret: e.currentTarget.value })} />
          </label>
          <label>
            Label (optional)
            <input name="label" value={form.label} onInput={(e) => setForm({ ...form, label: e.currentTarget.value })} />
          </label>
          <button type="submit" disabled={add.busy}>
            Add credential
          </button>
        </form>
        <ErrorBox error={add.error} />
        <Done text={add.done} />
      </Section>
      <Section title="Stored credentials" id="creds-title">
        <ErrorBox error={list.error || change.error} />
        <Done text={change.done} />
        {list.data && !creds.length ? (
          <Empty>No stored credentials: providers use the keys from the gateway's environment. Add one above to rotate keys here.</Empty>
        ) : null}
        {creds.length ? (
          <Table
            caption="Provider credentials, masked"
            testid="credentials"
            rowKey={(c) => c.id}
            columns={[
              { label: "Provider", key: "provider" },
              { label: "Label", key: "label" },
              { label: "Secret", render: (c) => <code>{c.masked}</code> },
              {
                label: "Status",
                render: (c) => (
                  <span class={`badge ${c.status === "active" ? "ok" : "bad"}`}>
                    {c.status}
                    {c.status_reason ? `: ${c.status_reason}` : ""}
                  </span>
                ),
              },
              {
                label: "Actions",
                render: (c) => (
                  <span class="actions">
                    {c.status !== "active" ? (
                      <button type="button" class="secondary" onClick={() => onActivate(c)} aria-label={`Activate ${c.masked}`}>
                        Activate
                      </button>
                    ) : null}
                    <button type="button" class="danger" onClick={() => onRemove(c)} aria-label={`Remove ${c.masked}`}>
                      Remove
                    </button>
                  </span>
                ),
              },
            ]}
            rows={creds}
          />
        ) : null}
      </Section>
    </>
  );
}

export function Health({ token }) {
  const [window_, setWindow] = useState(60);
  const health = useLoad(() => call(token, "GET", "/admin/health", { params: { window_minutes: window_ } }), [token, window_]);
  const rows = health.data?.deployments || [];
  return (
    <Section title="Provider health" id="health-title">
      <label class="metric">
        Window
        <select name="window" value={window_} onChange={(e) => setWindow(Number(e.currentTarget.value))}>
          <option value={15}>last 15 minutes</option>
          <option value={60}>last hour</option>
          <option value={1440}>last day</option>
          <option value={10080}>last week</option>
        </select>
      </label>
      <button type="button" class="secondary" onClick={health.reload}>
        Refresh
      </button>
      <ErrorBox error={health.error} />
      {health.loading ? <Loading what="health" /> : null}
      {health.data && !rows.length ? <Empty>No deployment served calls in this window and none is configured.</Empty> : null}
      {rows.length ? (
        <Table
          caption="Deployments: rests after repeated failures, and recent error rates"
          testid="health"
          rowKey={(d) => d.deployment}
          columns={[
            { label: "Deployment", key: "deployment" },
            {
              label: "State",
              key: "state",
              render: (d) => (
                <>
                  {d.resting ? (
                    <span class="badge bad">resting, back in {Math.ceil(d.rest_seconds_left)} s</span>
                  ) : (
                    <span class="badge ok">serving</span>
                  )}
                  {/* Stored credentials rest one by one (a 429 on one key rests that key). */}
                  {(d.resting_credentials || []).map((c) => (
                    <span class="badge bad" key={c.credential_id}>
                      credential {c.credential_id} resting, back in {Math.ceil(c.seconds_left)} s
                    </span>
                  ))}
                </>
              ),
            },
            { label: "Calls", key: "calls", num: true, render: (d) => int(d.calls) },
            { label: "Errors", key: "errors", num: true, render: (d) => int(d.errors) },
            {
              label: "Error rate",
              num: true,
              render: (d) => (d.calls ? `${((100 * d.errors) / d.calls).toFixed(1)} %` : "—"),
            },
          ]}
          rows={rows}
        />
      ) : null}
    </Section>
  );
}
