export const number = new Intl.NumberFormat("en-US");

export function int(value) {
  return number.format(Number(value || 0));
}

export function credits(value) {
  const n = Number(value || 0);
  return n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 6 });
}

export function time(value) {
  if (!value) return "—";
  const d = new Date(value);
  return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

export function day(date) {
  return date.toISOString().slice(0, 10);
}

export function addDays(text, days) {
  const d = new Date(`${text}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + days);
  return day(d);
}

export function ms(value) {
  if (value === undefined || value === null || value === "") return "—";
  return `${int(value)} ms`;
}
