// Calls to the gateway's REST API (same origin): the token travels only in the
// Authorization header, never in a URL, and lives in sessionStorage (gone when the tab
// closes). Errors keep the server's message, so the page can show it.

const STORE = "aigne-hub-dashboard";

export function savedSession() {
  try {
    const raw = sessionStorage.getItem(STORE);
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null;
  }
}

export function saveSession(session) {
  if (session) sessionStorage.setItem(STORE, JSON.stringify(session));
  else sessionStorage.removeItem(STORE);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(name, String(item));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export async function call(token, method, path, { params, body } = {}) {
  let response;
  try {
    response = await fetch(`${path}${query(params)}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body ? { "content-type": "application/json" } : {}),
      },
      body: body ? JSON.stringify(body) : undefined,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (exc) {
    throw new ApiError(0, `the gateway cannot be reached (${exc.message})`, "NETWORK");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    const message = error.message || (data && data.message) || `HTTP ${response.status}`;
    throw new ApiError(response.status, message, error.code || "");
  }
  return data ?? {};
}

// The owner's data, by API key (AccountService) or by the admin token for one owner.
export function keySource(token) {
  return {
    admin: false,
    account: () => call(token, "GET", "/account"),
    usage: (params) => call(token, "GET", "/account/usage", { params }),
    calls: (params) => call(token, "GET", "/account/calls", { params }),
  };
}

export function adminSource(token, owner) {
  return {
    admin: true,
    owner,
    async account() {
      if (!owner) return null;
      const [balance, held, keys, ownerLimits] = await Promise.all([
        call(token, "GET", "/admin/balance", { params: { owner } }),
        call(token, "GET", "/admin/reservations", { params: { owner } }),
        call(token, "GET", "/admin/keys", { params: { owner } }),
        call(token, "GET", "/admin/limits", { params: { owner } }),
      ]);
      const keyLimits = await Promise.all(
        (keys.keys || []).map((k) => call(token, "GET", "/admin/limits", { params: { key_id: k.id } })),
      );
      return {
        balance: balance.balance,
        reservations: held.reservations || [],
        keys: keys.keys || [],
        limits: [...(ownerLimits.limits || []), ...keyLimits.flatMap((l) => l.limits || [])],
      };
    },
    usage: (params) => call(token, "GET", "/admin/usage", { params: { ...params, owner } }),
    calls: (params) => call(token, "GET", "/admin/calls", { params: { ...params, owner } }),
  };
}
