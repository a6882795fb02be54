// End-to-end: two demo clients and the GM console in headless Chromium,
// against a real `guildchat serve` (started by scripts/browser-test, which
// passes ADMIN_URL, GM_KEY and ARTIFACTS). Each step waits on what the
// pages expose (window.demo, window.consoleData) with a bounded timeout;
// screenshots of every page go to ARTIFACTS.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const admin = process.env.ADMIN_URL;
const gmKey = process.env.GM_KEY;
const artifacts = process.env.ARTIFACTS || "browser-artifacts";
mkdirSync(artifacts, { recursive: true });

const profile = mkdtempSync(join(tmpdir(), "guildchat-chromium-"));
// A fresh, empty profile directory (playwright passes it as
// --user-data-dir).
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
  ],
});

let failed = false;
const step = async (name, fn) => {
  process.stdout.write(`- ${name} ... `);
  try {
    await fn();
    console.log("ok");
  } catch (e) {
    failed = true;
    console.log("FAILED\n  " + (e && e.message ? e.message.split("\n")[0] : e));
    for (const l of logs.slice(-20)) console.log("  | " + l);
    throw e;
  }
};

const waitFor = (page, fn, arg, what) =>
  page.waitForFunction(fn, arg, { timeout: 10000 }).catch(() => {
    throw new Error("timed out waiting for " + what);
  });

// Page errors and console lines, printed when a step fails; an uncaught
// error on any page fails the run.
const logs = [];
const pageErrors = [];
function watch(page, who) {
  page.on("console", (m) => logs.push(`${who}: ${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => {
    logs.push(`${who}: error: ${e.message}`);
    pageErrors.push(`${who}: ${e.message}`);
  });
  return page;
}

async function player(user, name, guild) {
  const page = watch(await browser.newPage(), name);
  await page.goto(admin + "/demo/");
  await page.fill("#user", String(user));
  await page.fill("#name", name);
  await page.fill("#guild", String(guild));
  await page.click("#who-form button[type=submit]");
  await waitFor(page, () => window.demo.loggedIn, null, name + " to log in");
  return page;
}

async function say(page, channel, text) {
  const before = await page.evaluate(() => window.demo.results.length);
  await page.selectOption("#channel", channel);
  await page.fill("#text", text);
  await page.click("#chat-form button[type=submit]");
  await waitFor(page, (n) => window.demo.results.length > n, before, "a chat reply");
  return page.evaluate(() => window.demo.results[window.demo.results.length - 1]);
}

const heard = (page, text) =>
  waitFor(page, (t) => window.demo.lines.some((l) => l.text === t), text, `"${text}"`);

try {
  let alice, bob, console_;
  await step("two demo clients log in over the JSON codec", async () => {
    alice = await player(1, "alice", 7);
    bob = await player(2, "bob", 7);
  });
  await step("they chat with each other", async () => {
    if ((await say(alice, "CHAT_WORLD", "hello from alice")) !== "RES_OK") throw new Error("alice's line refused");
    await heard(bob, "hello from alice");
    if ((await say(bob, "CHAT_GUILD", "hi alice")) !== "RES_OK") throw new Error("bob's line refused");
    await heard(alice, "hi alice");
  });
  await step("the console logs in with a key", async () => {
    console_ = watch(await browser.newPage(), "console");
    await console_.goto(admin + "/console/");
    await console_.fill("#key", gmKey);
    await console_.click("#login-form button[type=submit]");
    await console_.waitForSelector("#app:not([hidden])", { timeout: 10000 });
  });
  await step("the graphs show data after traffic", async () => {
    // Rates need traffic between two scrapes (2 s apart): keep talking
    // until the graphs show it, for at most 10 lines.
    const shown = () => {
      const d = window.consoleData;
      const some = (s) => s.some((v) => v > 0);
      return d.online.some((v) => v >= 2) && some(d.deliveries) && Object.values(d.chats).some(some);
    };
    for (let i = 0; i < 10 && !(await console_.evaluate(shown)); i++) {
      await say(alice, "CHAT_GUILD", "traffic " + i);
      await console_.waitForTimeout(1000);
    }
    await waitFor(console_, shown, null, "non-zero graphs");
  });
  await step("an announcement from the console reaches both pages", async () => {
    // Announcements need a logic key (gm keys moderate): a second console
    // tab logs in with one.
    const logic = await browser.newPage();
    await logic.goto(admin + "/console/");
    await logic.fill("#key", process.env.LOGIC_KEY);
    await logic.click("#login-form button[type=submit]");
    await logic.waitForSelector("#app:not([hidden])", { timeout: 10000 });
    await logic.fill("#announce-text", "maintenance at 06:00");
    await logic.click("#announce-form button[type=submit]");
    await waitFor(logic, () => document.getElementById("announce-result").textContent.startsWith("sent"), null, "the announce");
    await heard(alice, "maintenance at 06:00");
    await heard(bob, "maintenance at 06:00");
    await logic.close();
  });
  await step("the console finds bob and mutes him; his next chat is refused", async () => {
    await console_.fill("#find", "bob");
    await console_.click("#find-form button[type=submit]");
    await console_.waitForSelector("#player:not([hidden])", { timeout: 10000 });
    await console_.fill("#reason", "spam");
    await console_.fill("#seconds", "600");
    await console_.click("[data-act=mute]");
    await waitFor(console_, () => document.getElementById("act-result").textContent === "mute: done", null, "the mute");
    const result = await say(bob, "CHAT_GUILD", "can I talk?");
    if (result !== "RES_MUTED") throw new Error("bob's chat got " + result);
  });
  await step("the console kicks bob", async () => {
    await console_.click("[data-act=kick]");
    await waitFor(bob, () => window.demo.kicked === "KICK_OPERATOR", null, "bob's kick notice");
  });
} catch {
  failed = true;
} finally {
  // Kept whether or not a step failed: that is when they are wanted.
  for (const page of browser.pages()) {
    const name = await page.title().catch(() => "page");
    const n = browser.pages().indexOf(page);
    await page.screenshot({ path: join(artifacts, `${n}-${name.replace(/\W+/g, "_")}.png`), fullPage: true }).catch(() => {});
  }
  await browser.close();
}
if (pageErrors.length) {
  failed = true;
  console.log("uncaught errors on the pages:\n  " + pageErrors.join("\n  "));
}
console.log(failed ? "browser tests FAILED" : "browser tests passed");
process.exit(failed ? 1 : 0);
