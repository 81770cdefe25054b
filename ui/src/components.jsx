import { useEffect, useState } from "preact/hooks";

// Loads `load()` when `deps` change; gives {data, error, loading, reload}.
export function useLoad(load, deps) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    setState((s) => ({ ...s, loading: true, error: null }));
    load().then(
      (data) => live && setState({ data, error: null, loading: false }),
      (error) => live && setState({ data: null, error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [...deps, tick]);
  return { ...state, reload: () => setTick((t) => t + 1) };
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return (
    <div class="error" role="alert" data-testid="error">
      <strong>{error.status ? `Error ${error.status}` : "Error"}:</strong> {error.message}
    </div>
  );
}

export function Empty({ children }) {
  return (
    <p class="empty" data-testid="empty">
      {children}
    </p>
  );
}

export function Loading({ what }) {
  return (
    <p class="loading" aria-live="polite">
      Loading {what}…
    </p>
  );
}

export function Section({ title, children, id }) {
  return (
    <section class="card" aria-labelledby={id}>
      <h2 id={id}>{title}</h2>
      {children}
    </section>
  );
}

// A table that scrolls sideways on a phone instead of breaking the layout.
export function Table({ caption, columns, rows, testid, rowKey }) {
  return (
    <div class="table-wrap" tabindex="0" role="region" aria-label={caption}>
      <table data-testid={testid}>
        <caption>{caption}</caption>
        <thead>
          <tr>
            {columns.map((c) => (
              <th scope="col" class={c.num ? "num" : ""} key={c.label}>
                {c.label}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {rows.map((row, i) => (
            <tr key={rowKey ? rowKey(row) : i}>
              {columns.map((c) => (
                <td class={c.num ? "num" : ""} data-col={c.key} key={c.label}>
                  {c.render ? c.render(row) : row[c.key]}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

export function Stat({ label, value, testid, hint }) {
  return (
    <div class="stat">
      <div class="stat-label">{label}</div>
      <div class="stat-value" data-testid={testid}>
        {value}
      </div>
      {hint ? <div class="stat-hint">{hint}</div> : null}
    </div>
  );
}

// Runs an action from a form, showing its error or a message when it worked.
export function useAction() {
  const [state, setState] = useState({ busy: false, error: null, done: null });
  async function run(action, doneText) {
    setState({ busy: true, error: null, done: null });
    try {
      const result = await action();
      setState({ busy: false, error: null, done: doneText ? doneText(result) : null });
      return result;
    } catch (error) {
      setState({ busy: false, error, done: null });
      return undefined;
    }
  }
  return { ...state, run };
}

export function Done({ text }) {
  if (!text) return null;
  return (
    <p class="done" role="status" data-testid="done">
      {text}
    </p>
  );
}
