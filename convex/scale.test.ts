/// <reference types="vite/client" />
// A big deployment under the real per-function limits: 10,000 users and 50,000 jobs, one user
// with 10,000 of them. Every function the gateway and the web app call must stay within
// 32,000 documents and 16 MiB read and 4,096 index ranges (convex-backend
// `npm-packages/docs/docs/production/state/limits.mdx`), which convex-test enforces with
// `transactionLimits: true` (0.0.60 `dist/transactionMetrics.js`); the audit must still succeed.
import { convexTest } from "convex-test";
import { beforeAll, describe, expect, test } from "vitest";
import { api, internal } from "./_generated/api";
import type { Doc } from "./_generated/dataModel";
import type { JobStatus } from "./model";
import schema from "./schema";

const modules = import.meta.glob("./**/*.*s");

const USERS = 10_000;
const JOBS = 50_000;
const HEAVY = "user_heavy"; // the user with 10,000 jobs
const HEAVY_JOBS = 10_000;
const SIGNUP = 100;
const NOW = 1_800_000_000_000;
const HOUR = 3_600_000;
// convex-test applies the write limits to `t.run` too: at most 16,000 documents per call.
const WRITES_PER_RUN = 15_000;

type Row =
  | { table: "users"; doc: Omit<Doc<"users">, "_id" | "_creationTime"> }
  | { table: "jobs"; doc: Omit<Doc<"jobs">, "_id" | "_creationTime"> }
  | { table: "ledger"; doc: Omit<Doc<"ledger">, "_id" | "_creationTime"> }
  | { table: "idempotency"; doc: Omit<Doc<"idempotency">, "_id" | "_creationTime"> };

let t: ReturnType<typeof convexTest<typeof schema.tables>>;

const userIds = [HEAVY, ...Array.from({ length: USERS - 1 }, (_, i) => `user_${i}`)];

/** Job `n` of a user: mostly done; every 10th failed (and refunded); a few still active. */
function statusOf(n: number, active: boolean): JobStatus {
  if (active) {
    return n % 2 === 0 ? "queued" : "running";
  }
  return n % 10 === 9 ? "failed" : "done";
}

/** Every document of the deployment, with balances that agree with the ledger. */
function deployment(): Row[] {
  const users: Row[] = [];
  const rest: Row[] = [];
  let jobNumber = 0;
  userIds.forEach((userId, u) => {
    // The heavy user has 10,000 jobs and a grant to pay for them; the others share the rest.
    const count = u === 0 ? HEAVY_JOBS : u <= (JOBS - HEAVY_JOBS) % (USERS - 1) ? 5 : 4;
    const grant = u === 0 ? HEAVY_JOBS : 0;
    let credits = SIGNUP + grant;
    rest.push(ledgerRow(userId, undefined, "grant", SIGNUP));
    if (grant > 0) {
      rest.push(ledgerRow(userId, undefined, "grant", grant));
    }
    for (let n = 0; n < count; n++) {
      // The heavy user's 3 newest jobs, and the newest of every 10th user, are in flight.
      const active = u === 0 ? n >= count - 3 : u % 10 === 0 && n === count - 1;
      const status = statusOf(n, active);
      const jobId = `job_${String(jobNumber++).padStart(6, "0")}`;
      rest.push({ table: "jobs", doc: job(jobId, userId, status, NOW - HOUR + n * 100) });
      rest.push(ledgerRow(userId, jobId, "charge", 1));
      credits -= 1;
      if (status === "failed") {
        rest.push(ledgerRow(userId, jobId, "refund", 1));
        credits += 1;
      }
    }
    users.push({
      table: "users",
      doc: { userId, credits, plan: "starter", createdAt: NOW, updatedAt: NOW },
    });
  });
  for (let i = 0; i < 2_000; i++) {
    // Expired Idempotency-Keys waiting for the purge, and a few live ones.
    const expiresAt = i < 1_900 ? NOW - HOUR : NOW + HOUR;
    const doc = { userId: userIds[i], key: `key_${i}`, fingerprint: "f", state: "done" as const };
    rest.push({ table: "idempotency", doc: { ...doc, claimedAt: NOW - HOUR, expiresAt } });
  }
  return [...users, ...rest];
}

function job(jobId: string, userId: string, status: JobStatus, createdAt: number) {
  return {
    jobId,
    userId,
    status,
    prompt: "A silver drone flies through a neon skyline",
    durationSec: 1,
    seed: 42,
    cost: 1,
    objectKey: `videos/${userId}/${jobId}.mp4`,
    runpodId: `rp_${jobId}`,
    ...(status === "failed" ? { errorCode: "WORKER_FAILED", errorDetail: "boom" } : {}),
    createdAt,
    updatedAt: createdAt,
    checkedAt: createdAt, // an hour old: every active job is stale for the reconciler
  };
}

function ledgerRow(
  userId: string,
  jobId: string | undefined,
  kind: Doc<"ledger">["kind"],
  amount: number,
): Row {
  const doc = { userId, kind, amount, reason: kind, createdAt: NOW };
  return { table: "ledger", doc: jobId === undefined ? doc : { ...doc, jobId } };
}

async function seed(rows: Row[]): Promise<void> {
  for (let start = 0; start < rows.length; start += WRITES_PER_RUN) {
    const chunk = rows.slice(start, start + WRITES_PER_RUN);
    await t.run(async (ctx) => {
      for (const row of chunk) {
        await ctx.db.insert(row.table, row.doc as never);
      }
    });
  }
}

async function walk<K extends "totals" | "problems">(
  fn: typeof internal.gateway.ledgerTotals | typeof internal.gateway.audit,
  field: K,
) {
  const items: unknown[] = [];
  let cursor: string | null = null;
  let calls = 0;
  do {
    const page = (await t.query(fn, { cursor })) as Record<K, unknown[]> & {
      cursor: string | null;
    };
    items.push(...page[field]);
    cursor = page.cursor;
    calls += 1;
  } while (cursor !== null);
  return { items, calls };
}

const newUser = { signupCredits: SIGNUP, plan: "starter" };

beforeAll(async () => {
  t = convexTest({ schema, modules, transactionLimits: true });
  const rows = deployment();
  expect(rows.filter((row) => row.table === "jobs")).toHaveLength(JOBS);
  await seed(rows);
}, 300_000);

describe("a deployment of 10,000 users and 50,000 jobs, with the limits on", () => {
  test("the totals cover every user, the heavy one exactly", async () => {
    const { items } = await walk(internal.gateway.ledgerTotals, "totals");
    expect(items).toHaveLength(USERS);
    const heavy = items.find((row) => (row as { userId: string }).userId === HEAVY);
    // 10,000 charges, 1,000 of them refunded; signup plus a 10,000 grant.
    expect(heavy).toEqual({
      userId: HEAVY,
      credits: 1_099,
      grants: 10_100,
      charges: 10_000,
      refunds: 999,
    });
  }, 300_000);

  test("every gateway request path of the heavy user stays within the limits", async () => {
    expect(await t.query(internal.gateway.getUser, { userId: HEAVY })).toMatchObject({
      credits: 1_099,
    });
    const created = await t.mutation(internal.gateway.chargeAndCreateJob, {
      job: {
        jobId: "job_new",
        userId: HEAVY,
        prompt: "p",
        imageUrl: null,
        durationSec: 1,
        seed: 1,
        cost: 1,
        objectKey: "videos/user_heavy/job_new.mp4",
      },
      maxActive: 5,
      idempotencyKey: "key_new",
      ...newUser,
    });
    expect(created.status).toBe("submitting");
    await t.mutation(internal.gateway.recordRunpodId, { jobId: "job_new", runpodId: "rp_new" });
    await t.mutation(internal.gateway.applyStatus, { jobId: "job_new", status: "running" });
    const found = await t.query(internal.gateway.findJobByRunpodId, { runpodId: "rp_new" });
    expect(found?.status).toBe("running");
    const canceled = await t.mutation(internal.gateway.cancelJob, {
      userId: HEAVY,
      jobId: "job_new",
    });
    expect(canceled.status).toBe("canceled");
    const failed = await t.mutation(internal.gateway.applyStatus, {
      jobId: "job_000000",
      status: "failed", // a done job: nothing moves
    });
    expect(failed.changed).toBe(false);
    expect(
      await t.query(internal.gateway.getJob, { userId: HEAVY, jobId: "job_new" }),
    ).toMatchObject({ status: "canceled" });
    expect(await t.query(internal.gateway.findJob, { jobId: "job_009999" })).not.toBeNull();
    await t.mutation(internal.gateway.saveDownloadUrl, {
      jobId: "job_000000",
      url: "u",
      expiresAt: 1,
    });
    const granted = await t.mutation(internal.gateway.grantCredits, {
      userId: HEAVY,
      amount: 5,
      reason: "support",
      ...newUser,
    });
    expect(granted.credits).toBe(1_099 + 5); // the new job was charged, then refunded
    const newcomer = await t.mutation(internal.gateway.getOrCreateUser, {
      userId: "user_newcomer",
      ...newUser,
    });
    expect(newcomer.signupGrant).toBe(SIGNUP);
    expect(await t.query(internal.gateway.ping, {})).toBeNull();
  }, 300_000);

  test("listing pages through the heavy user's 10,000 jobs a page at a time", async () => {
    const first = await t.query(internal.gateway.listJobs, {
      userId: HEAVY,
      limit: 100,
      cursor: null,
    });
    expect(first.jobs).toHaveLength(100);
    const second = await t.query(internal.gateway.listJobs, {
      userId: HEAVY,
      limit: 100,
      cursor: first.nextCursor,
    });
    expect(second.jobs).toHaveLength(100);
    expect(second.jobs[0].createdAt).toBeLessThanOrEqual(first.jobs[99].createdAt);
  }, 300_000);

  test("idempotency keys: claim, complete, release and the purge", async () => {
    const claim = { userId: HEAVY, fingerprint: "g", now: NOW, ttlMs: HOUR, staleMs: 1_000 };
    const claimed = await t.mutation(internal.gateway.claimIdempotencyKey, { ...claim, key: "k1" });
    expect(claimed.outcome).toBe("claimed");
    await t.mutation(internal.gateway.completeIdempotencyKey, {
      userId: HEAVY,
      key: "k1",
      statusCode: 200,
      body: "{}",
    });
    await t.mutation(internal.gateway.claimIdempotencyKey, { ...claim, key: "k2" });
    await t.mutation(internal.gateway.releaseIdempotencyKey, { userId: HEAVY, key: "k2" });
    // The gateway purges 500 at a time: far more are waiting, and each call stays bounded.
    const purge = (limit: number) =>
      t.mutation(internal.gateway.purgeIdempotencyKeys, { before: NOW, limit });
    expect(await purge(500)).toBe(500);
    // Asking for everything at once still deletes at most 1,000 a call; the next takes the rest.
    expect(await purge(1_000_000)).toBe(1_000);
    expect(await purge(1_000_000)).toBe(400);
  }, 300_000);

  test("the reconciler claims stale jobs among a thousand, bounded by its limit", async () => {
    const claimed = await t.mutation(internal.gateway.claimStaleJobs, {
      staleBefore: NOW,
      now: NOW + 1,
      limit: 50,
    });
    expect(claimed).toHaveLength(50);
    const active = await t.run(async (ctx) =>
      ctx.db
        .query("jobs")
        .withIndex("by_user_status", (q) => q.eq("userId", "user_9989").eq("status", "running"))
        .first(),
    );
    const check = await t.mutation(internal.gateway.claimJobCheck, {
      jobId: active!.jobId,
      staleBefore: NOW,
      now: NOW + 2,
    });
    expect(check?.jobId).toBe(active!.jobId);
    // The other 951 stale jobs in one call: far more than the gateway's 50, still bounded.
    const rest = await t.mutation(internal.gateway.claimStaleJobs, {
      staleBefore: NOW,
      now: NOW + 3,
      limit: 1_000_000,
    });
    expect(rest).toHaveLength(1_002 - 50 - 1);
  }, 300_000);

  test("the web app's queries for the heavy user", async () => {
    const heavy = t.withIdentity({ subject: HEAVY });
    expect(await heavy.query(api.webapp.myCredits, {})).toMatchObject({ plan: "starter" });
    const first = await heavy.query(api.webapp.myJobs, {
      paginationOpts: { numItems: 50, cursor: null },
    });
    expect(first.page).toHaveLength(50);
    const second = await heavy.query(api.webapp.myJobs, {
      paginationOpts: { numItems: 50, cursor: first.continueCursor },
    });
    expect(second.page).toHaveLength(50);
    expect(await heavy.query(api.webapp.myJob, { jobId: "job_000001" })).not.toBeNull();
  }, 300_000);

  test("the audit walks all of it, after all of that, and finds the books in order", async () => {
    const { items, calls } = await walk(internal.gateway.audit, "problems");
    expect(items).toEqual([]);
    expect(calls).toBeGreaterThan(5); // 180,000 documents: no single call could read them all
  }, 300_000);
});
