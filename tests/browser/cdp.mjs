// Drive headless Chromium over the DevTools protocol to check an `lca report` page:
//   node --experimental-websocket cdp.mjs CHROMIUM REPORT.html OUTDIR
// Loads the page from file:// with the network of the browser cut off, and fails (exit 1) on
// any console error or warning, uncaught exception, or request that is not file: or data:.
// Checks that every figure and table is laid out and visible, that clicking a column heading
// sorts a table (and again reverses it), that the page still shows every table with
// JavaScript disabled, and that it prints. Writes OUTDIR/report-1280x2000.png (the top of the
// page as a laptop shows it), OUTDIR/report-full.png (the whole page) and
// OUTDIR/report-partN.png (the whole page in 1280×2000 parts), OUTDIR/report.pdf and
// OUTDIR/report-print.png (the top of the page with print CSS, A4 width).
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const [chromium, page, outDir] = process.argv.slice(2);
if (!chromium || !page || !outDir) {
  console.error("usage: cdp.mjs CHROMIUM REPORT.html OUTDIR");
  process.exit(2);
}
const url = "file://" + resolve(page);
const profile = mkdtempSync(join(tmpdir(), "lca-report-chromium-"));
const problems = [];
const proc = spawn(chromium, [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-extensions", "--hide-scrollbars", `--user-data-dir=${profile}`,
  "--remote-debugging-port=0", "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });

const timer = setTimeout(() => fail("timed out after 60 s"), 60000);
function fail(msg) {
  console.error("FAIL: " + msg);
  cleanup(1);
}
function cleanup(code) {
  clearTimeout(timer);
  try { proc.kill("SIGTERM"); } catch {}
  setTimeout(() => {
    try { rmSync(profile, { recursive: true, force: true }); } catch {}
    process.exit(code);
  }, 300);
}

const wsUrl = await new Promise((ok, ko) => {
  let buf = "";
  proc.stderr.on("data", (d) => {
    buf += d;
    const m = buf.match(/DevTools listening on (ws:\/\/\S+)/);
    if (m) ok(m[1]);
  });
  proc.on("exit", (c) => ko(new Error("chromium exited with " + c + ":\n" + buf)));
}).catch((e) => fail(e.message));

const port = new URL(wsUrl).port;
const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
const target = targets.find((t) => t.type === "page");
const ws = new WebSocket(target.webSocketDebuggerUrl);
await new Promise((ok) => ws.addEventListener("open", ok));
let id = 0;
const pending = new Map();
const waiters = [];
ws.addEventListener("message", (ev) => {
  const msg = JSON.parse(ev.data);
  if (msg.id && pending.has(msg.id)) {
    const { ok, ko } = pending.get(msg.id);
    pending.delete(msg.id);
    msg.error ? ko(new Error(JSON.stringify(msg.error))) : ok(msg.result);
    return;
  }
  const p = msg.params || {};
  switch (msg.method) {
    case "Runtime.consoleAPICalled":
      if (["error", "warning", "assert"].includes(p.type))
        problems.push(`console.${p.type}: ` + p.args.map((a) => a.value ?? a.description).join(" "));
      break;
    case "Runtime.exceptionThrown":
      problems.push("uncaught exception: " + (p.exceptionDetails.exception?.description ?? p.exceptionDetails.text));
      break;
    case "Log.entryAdded":
      if (["error", "warning"].includes(p.entry.level) && !/favicon/.test(p.entry.url ?? ""))
        problems.push(`log ${p.entry.level}: ${p.entry.text} ${p.entry.url ?? ""}`);
      break;
    case "Network.requestWillBeSent": {
      const u = p.request.url;
      if (!u.startsWith("file:") && !u.startsWith("data:") && u !== "about:blank")
        problems.push("network request: " + u);
      break;
    }
  }
  for (const w of waiters.splice(0)) if (w.method === msg.method) w.ok(p); else waiters.push(w);
});
const send = (method, params = {}) =>
  new Promise((ok, ko) => {
    const n = ++id;
    pending.set(n, { ok, ko });
    ws.send(JSON.stringify({ id: n, method, params }));
  });
const once = (method) => new Promise((ok) => waiters.push({ method, ok }));
const evaluate = async (expr) => {
  const r = await send("Runtime.evaluate", { expression: expr, returnByValue: true, awaitPromise: true });
  if (r.exceptionDetails) throw new Error(expr + ": " + JSON.stringify(r.exceptionDetails));
  return r.result.value;
};

try {
  for (const d of ["Runtime", "Log", "Network", "Page"]) await send(d + ".enable");
  // Cut the browser off: any request that leaves the file would fail, and is reported above.
  await send("Network.emulateNetworkConditions", { offline: true, latency: 0, downloadThroughput: 0, uploadThroughput: 0 });
  await send("Emulation.setDeviceMetricsOverride", { width: 1280, height: 2000, deviceScaleFactor: 1, mobile: false });
  let loaded = once("Page.loadEventFired");
  await send("Page.navigate", { url });
  await loaded;

  const facts = await evaluate(`(() => {
    const vis = (el) => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
      return r.width > 100 && r.height > 100 && s.display !== "none" && s.visibility !== "hidden"; };
    const figs = [...document.querySelectorAll("figure")].map((f) => {
      const g = f.querySelector("svg, img");
      return { id: f.id, drawn: !!g && vis(g), texts: g ? g.querySelectorAll("text").length : 0 };
    });
    const tables = [...document.querySelectorAll("table.sortable")].map((t) => ({
      id: t.id, rows: t.tBodies[0].rows.length, buttons: t.tHead.querySelectorAll("th button").length,
      cols: t.tHead.rows[0].cells.length }));
    return { figs, tables, title: document.title, width: document.documentElement.scrollWidth,
             height: document.documentElement.scrollHeight,
             residual: document.getElementById("residual-table")?.textContent ?? "" };
  })()`);
  for (const f of facts.figs) if (!f.drawn) problems.push(`figure ${f.id} is not visible`);
  if (facts.figs.length < 5) problems.push(`only ${facts.figs.length} figures`);
  for (const t of facts.tables) {
    if (t.rows === 0 && t.id !== "steps-table") problems.push(`table ${t.id} is empty`);
    if (t.buttons !== t.cols) problems.push(`table ${t.id}: the script did not make its headings buttons`);
  }
  if (facts.width > 1280) problems.push(`the page is ${facts.width} px wide: horizontal scrolling at 1280 px`);
  if (!/training loss/.test(facts.residual)) problems.push("no residual table");

  // Screenshots (before any interaction): the top of the page at 1280×2000, then the whole
  // page.
  await evaluate("window.scrollTo(0, 0)");
  let shot = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(join(outDir, "report-1280x2000.png"), Buffer.from(shot.data, "base64"));
  const full = Math.min(facts.height, 16000);
  await send("Emulation.setDeviceMetricsOverride", { width: 1280, height: full, deviceScaleFactor: 1, mobile: false });
  shot = await send("Page.captureScreenshot", { format: "png", captureBeyondViewport: true });
  writeFileSync(join(outDir, "report-full.png"), Buffer.from(shot.data, "base64"));
  // ... and in 1280×2000 parts, which an image viewer shows at full size.
  for (let y = 0, k = 1; y < full; y += 2000, k++) {
    shot = await send("Page.captureScreenshot", {
      format: "png", captureBeyondViewport: true,
      clip: { x: 0, y, width: 1280, height: Math.min(2000, full - y), scale: 1 },
    });
    writeFileSync(join(outDir, `report-part${k}.png`), Buffer.from(shot.data, "base64"));
  }

  // Sorting: click the LCA heading of the layers table: ascending, then descending.
  const sorted = await evaluate(`(() => {
    const t = document.getElementById("layers-table");
    const col = [...t.tHead.rows[0].cells].findIndex((c) => c.textContent.trim().startsWith("LCA"));
    const vals = () => [...t.tBodies[0].rows].map((r) => parseFloat(r.cells[col].getAttribute("data-v")));
    const b = t.tHead.rows[0].cells[col].querySelector("button");
    b.click(); const up = vals(); b.click(); const down = vals();
    return { up, down, sort: t.tHead.rows[0].cells[col].getAttribute("aria-sort") };
  })()`);
  const isSorted = (a, cmp) => a.every((v, i) => i === 0 || cmp(a[i - 1], v));
  if (!isSorted(sorted.up, (a, b) => a <= b)) problems.push("ascending sort failed: " + sorted.up);
  if (!isSorted(sorted.down, (a, b) => a >= b)) problems.push("descending sort failed: " + sorted.down);
  if (sorted.sort !== "descending") problems.push("aria-sort not updated");

  // Printing (at the laptop width again).
  await send("Emulation.setDeviceMetricsOverride", { width: 1280, height: 2000, deviceScaleFactor: 1, mobile: false });
  const pdf = await send("Page.printToPDF", { printBackground: false, preferCSSPageSize: false });
  const pdfBytes = Buffer.from(pdf.data, "base64");
  writeFileSync(join(outDir, "report.pdf"), pdfBytes);
  if (pdfBytes.length < 10000) problems.push("the printed PDF is suspiciously small");
  // What print CSS does, as a picture: the first 3000 px at the width of an A4 page (96 dpi).
  await send("Emulation.setEmulatedMedia", { media: "print" });
  await send("Emulation.setDeviceMetricsOverride", { width: 794, height: 3000, deviceScaleFactor: 1, mobile: false });
  shot = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(join(outDir, "report-print.png"), Buffer.from(shot.data, "base64"));
  await send("Emulation.setEmulatedMedia", { media: "" });

  // Without JavaScript every table is still there, in model order, and readable.
  await send("Emulation.setScriptExecutionDisabled", { value: true });
  loaded = once("Page.loadEventFired");
  await send("Page.reload", { ignoreCache: true });
  await loaded;
  const nojs = await send("Runtime.evaluate", {
    expression: `JSON.stringify([...document.querySelectorAll("table.sortable")].map((t) => [t.id, t.tBodies[0].rows.length, t.tHead.querySelectorAll("button").length, t.getBoundingClientRect().height]))`,
    returnByValue: true,
  });
  const rows = JSON.parse(nojs.result.value);
  for (const [tid, n, buttons, height] of rows) {
    if (buttons !== 0) problems.push(`${tid}: buttons without JavaScript?`);
    if (n === 0 && tid !== "steps-table") problems.push(`${tid}: empty without JavaScript`);
    if (height === 0 && tid !== "steps-table") problems.push(`${tid}: not shown without JavaScript`);
  }

  console.log(`page: ${facts.title}; ${facts.figs.length} figures (${facts.figs.map((f) => f.id + ":" + f.texts + " texts").join(", ")}); ` +
    `${facts.tables.length} sortable tables (${facts.tables.map((t) => t.id + ":" + t.rows).join(", ")}); ${facts.width}×${facts.height} px; PDF ${pdfBytes.length} bytes`);
  if (problems.length) {
    for (const p of problems) console.error("problem: " + p);
    cleanup(1);
  } else {
    console.log("OK: no console errors, no exceptions, no network requests; figures and tables visible; sorting works; readable without JavaScript; prints");
    cleanup(0);
  }
} catch (e) {
  fail(e.stack || String(e));
}
