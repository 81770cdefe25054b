import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { int } from "./format.js";

const METRICS = {
  calls: { label: "Requests", unit: "requests", axis: "Requests per day" },
  tokens: { label: "Tokens", unit: "tokens (input + output)", axis: "Tokens per day (input + output)" },
  credits: { label: "Credits", unit: "credits", axis: "Credits per day" },
};
const HALF_DAY = 43200;

// A bar chart of one metric per UTC day, with labelled axes. The same numbers are in
// the table beside it (the accessible alternative to the canvas).
export function DailyChart({ days, metric }) {
  const box = useRef(null);
  useEffect(() => {
    const el = box.current;
    if (!el) return undefined;
    const xs = days.map((d) => Date.parse(`${d.day}T00:00:00Z`) / 1000);
    // A day without calls has no bar (rather than a flat line at zero).
    const ys = days.map((d) => d[metric] || null);
    const { label, axis } = METRICS[metric];
    const width = Math.max(280, el.clientWidth);
    const plot = new uPlot(
      {
        width,
        height: 260,
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
        legend: { show: false },
        cursor: { show: true, drag: { x: false, y: false } },
        scales: { x: { time: true, range: (u, min, max) => [min - HALF_DAY, max + HALF_DAY] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] } },
        axes: [
          { label: "Day (UTC)", stroke: "#1f2937", grid: { stroke: "#e5e7eb" } },
          {
            label: axis,
            stroke: "#1f2937",
            grid: { stroke: "#e5e7eb" },
            size: 70,
            // Credits can be fractions of a cent: three significant digits, not two decimals.
            values: (u, splits) => splits.map((v) => (metric === "credits" ? String(Number(v.toPrecision(3))) : int(v))),
          },
        ],
        series: [
          {},
          {
            label,
            fill: "rgba(37, 99, 235, 0.55)",
            stroke: "#1d4ed8",
            width: 1,
            paths: uPlot.paths.bars({ size: [0.7, 48] }),
            points: { show: false },
          },
        ],
      },
      [xs, ys],
      el,
    );
    const resize = () => plot.setSize({ width: Math.max(280, el.clientWidth), height: 260 });
    window.addEventListener("resize", resize);
    return () => {
      window.removeEventListener("resize", resize);
      plot.destroy();
    };
  }, [days, metric]);
  const { label, unit } = METRICS[metric];
  return (
    <div class="chart" ref={box} role="img" aria-label={`${label} per UTC day (x: day, y: ${unit})`} data-testid="chart" />
  );
}

export { METRICS };
