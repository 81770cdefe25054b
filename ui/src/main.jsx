import { render } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { AdminOwner, Credentials, Credits, Health, Keys } from "./admin.jsx";
import { ApiError, call, keySource, saveSession, savedSession } from "./api.js";
import { ErrorBox } from "./components.jsx";
import { Calls, Overview, Usage } from "./owner.jsx";
import "./style.css";

const KEY_PAGES = [
  ["overview", "Overview"],
  ["usage", "Usage"],
  ["calls", "Recent calls"],
];
const ADMIN_PAGES = [
  ["usage", "Usage"],
  ["calls", "Recent calls"],
  ["account", "Accounts"],
  ["keys", "Keys"],
  ["credits", "Credits"],
  ["credentials", "Credentials"],
  ["health", "Health"],
];

function currentPage() {
  return window.location.hash.replace(/^#\/?/, "") || "";
}

// Checks the token against the API before keeping it: an API key reads its account,
// the admin token lists one key. Nothing of the answer is shown on failure but the
// server's message.
async function signIn(token) {
  if (token.startsWith("ahk_")) {
    const account = await call(token, "GET", "/account");
    return { token, mode: "key", label: `${account.key.owner} (${account.key.display})` };
  }
  await call(token, "GET", "/admin/keys", { params: { page_size: 1 } });
  return { token, mode: "admin", label: "administrator" };
}

function SignIn({ onSession }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  async function submit(event) {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onSession(await signIn(token.trim()));
    } catch (exc) {
      setError(exc instanceof ApiError ? exc : new ApiError(0, String(exc.message || exc)));
    } finally {
      setBusy(false);
    }
  }
  return (
    <main id="main" class="signin">
      <h1>AIGNE Hub dashboard</h1>
      <p>
        Sign in with an <strong>API key</strong> (<code>ahk_…</code>) to see your balance, usage and calls, or with the{" "}
        <strong>admin token</strong> to manage keys, credits and providers.
      </p>
      <form onSubmit={submit}>
        <label for="token">API key or admin token</label>
        <input
          id="token"
          name="token"
          type="password"
          autocomplete="off"
          required
          value={token}
          onInput={(e) => setToken(e.currentTarget.value)}
        />
        <button type="submit" disabled={busy}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
      <ErrorBox error={error} />
      <p class="note">The token stays in this tab only (session storage) and is sent as a Bearer header.</p>
    </main>
  );
}

function Dashboard({ session, onSignOut }) {
  const pages = session.mode === "admin" ? ADMIN_PAGES : KEY_PAGES;
  const [page, setPage] = useState(currentPage() || pages[0][0]);
  const [owner, setOwner] = useState("");
  useEffect(() => {
    const onHash = () => setPage(currentPage() || pages[0][0]);
    window.addEventListener("hashchange", onHash);
    return () => window.removeEventListener("hashchange", onHash);
  }, [pages]);
  const known = pages.find(([name]) => name === page);
  const title = known ? known[1] : "Not found";
  useEffect(() => {
    document.title = `${title} · AIGNE Hub dashboard`;
    const heading = document.getElementById("page-title");
    if (heading) heading.focus();
  }, [title]);
  const source = useMemo(() => keySource(session.token), [session.token]);
  let body = <p>No such page. Choose one from the menu.</p>;
  if (session.mode === "key") {
    if (page === "overview") body = <Overview source={source} />;
    if (page === "usage") body = <Usage source={source} />;
    if (page === "calls") body = <Calls source={source} />;
  } else if (known) {
    const t = session.token;
    if (["usage", "calls", "account"].includes(page))
      body = <AdminOwner token={t} page={page} owner={owner} setOwner={setOwner} />;
    if (page === "keys") body = <Keys token={t} />;
    if (page === "credits") body = <Credits token={t} />;
    if (page === "credentials") body = <Credentials token={t} />;
    if (page === "health") body = <Health token={t} />;
  }
  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("page-title")?.focus(); }}>
        Skip to content
      </a>
      <header class="top">
        <span class="brand">AIGNE Hub</span>
        <nav aria-label="Pages">
          <ul>
            {pages.map(([name, label]) => (
              <li key={name}>
                <a href={`#/${name}`} aria-current={name === page ? "page" : undefined}>
                  {label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="who">
          <span data-testid="signed-in-as">{session.label}</span>
          <button type="button" class="secondary" onClick={onSignOut}>
            Sign out
          </button>
        </span>
      </header>
      <main id="main">
        <h1 id="page-title" tabindex="-1">
          {title}
        </h1>
        {body}
      </main>
    </>
  );
}

function App() {
  const [session, setSession] = useState(savedSession());
  function keep(next) {
    saveSession(next);
    setSession(next);
  }
  if (!session) return <SignIn onSession={keep} />;
  return (
    <Dashboard
      session={session}
      onSignOut={() => {
        keep(null);
        window.location.hash = "";
      }}
    />
  );
}

render(<App />, document.getElementById("app"));
