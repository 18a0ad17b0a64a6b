/// <reference types="vite/client" />
import { convexTest } from "convex-test";
import { ConvexError } from "convex/values";
import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "./_generated/api";
import type { Doc } from "./_generated/dataModel";
import { isInvalidCursor, type ErrorCode, type JobStatus } from "./model";
import schema from "./schema";

const modules = import.meta.glob("./**/*.*s");

const NEW_USER = { signupCredits: 10, plan: "free" };
const ALICE = "user_alice";
const BOB = "user_bob";

let t: ReturnType<typeof convexTest<typeof schema.tables>>;

beforeEach(() => {
  // The real backend's per-function limits, on (convex-test 0.0.60 `dist/transactionMetrics.js`
  // DEFAULT_TRANSACTION_LIMITS: 32,000 documents and 16 MiB read, 4,096 index ranges). Only the
  // options-object form takes them: `convexTest(schema, modules, {...})` has no third parameter
  // (`dist/index.js` `convexTest(schemaOrOptions, modules)`), so it would silently run without.
  t = convexTest({ schema, modules, transactionLimits: true });
});

function newJob(jobId: string, overrides: Partial<{ userId: string; cost: number }> = {}) {
  const userId = overrides.userId ?? ALICE;
  return {
    jobId,
    userId,
    prompt: "A silver drone flies through a neon skyline",
    imageUrl: null,
    durationSec: 5,
    seed: 42,
    cost: overrides.cost ?? 3,
    objectKey: `videos/${userId}/${jobId}.mp4`,
  };
}

async function charge(jobId: string, overrides: Partial<{ userId: string; cost: number }> = {}) {
  return await t.mutation(internal.gateway.chargeAndCreateJob, {
    job: newJob(jobId, overrides),
    maxActive: 5,
    ...NEW_USER,
  });
}

/** The job as stored, read back later: without `signupGrant`, which only the charge answers. */
async function chargedRecord(jobId: string) {
  const { signupGrant, ...job } = await charge(jobId);
  expect(signupGrant).toBe(NEW_USER.signupCredits);
  return job;
}

async function setStatus(jobId: string, status: JobStatus, more: object = {}) {
  return await t.mutation(internal.gateway.applyStatus, { jobId, status, ...more });
}

/** The ConvexError a call threw, after checking its code. */
async function refusal(call: Promise<unknown>, code: ErrorCode) {
  const error = await call.then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(ConvexError);
  const data = (error as ConvexError<{ code: string; message: string }>).data;
  expect(data.code).toBe(code);
  expect(typeof data.message).toBe("string");
  return data;
}

async function credits(userId: string): Promise<number | undefined> {
  const user = await t.run((ctx) =>
    ctx.db
      .query("users")
      .withIndex("by_userId", (q) => q.eq("userId", userId))
      .unique(),
  );
  return user?.credits;
}

async function ledger(): Promise<Doc<"ledger">[]> {
  return await t.run((ctx) => ctx.db.query("ledger").collect());
}

/** Every user's totals, walked across calls as `convex_client.py` walks them. */
async function ledgerTotals(maxReads?: number) {
  const totals = [];
  let cursor: string | null = null;
  do {
    const page: { totals: unknown[]; cursor: string | null } = await t.query(
      internal.gateway.ledgerTotals,
      { cursor, maxReads },
    );
    totals.push(...page.totals);
    cursor = page.cursor;
  } while (cursor !== null);
  return totals;
}

/** Every problem the audit finds, walked across calls; and how many calls it took. */
async function auditWalk(maxReads?: number) {
  const problems = [];
  let cursor: string | null = null;
  let calls = 0;
  do {
    const page: { problems: string[]; cursor: string | null } = await t.query(
      internal.gateway.audit,
      { cursor, maxReads },
    );
    problems.push(...page.problems);
    cursor = page.cursor;
    calls += 1;
  } while (cursor !== null);
  return { problems, calls };
}

async function jobCount(): Promise<number> {
  return (await t.run((ctx) => ctx.db.query("jobs").collect())).length;
}

/** Insert a job directly, to control `createdAt` (and `checkedAt`, which defaults to it). */
async function insertJob(
  jobId: string,
  userId: string,
  createdAt: number,
  more: Partial<Pick<Doc<"jobs">, "status" | "checkedAt">> = {},
) {
  await t.run(async (ctx) => {
    await ctx.db.insert("jobs", {
      ...newJob(jobId, { userId }),
      imageUrl: undefined,
      status: "queued",
      createdAt,
      updatedAt: createdAt,
      checkedAt: createdAt,
      ...more,
    });
  });
}

async function patchJob(jobId: string, fields: Partial<Doc<"jobs">>) {
  await t.run(async (ctx) => {
    const job = await ctx.db
      .query("jobs")
      .withIndex("by_jobId", (q) => q.eq("jobId", jobId))
      .unique();
    await ctx.db.patch("jobs", job!._id, fields);
  });
}

describe("getOrCreateUser", () => {
  test("creates a user with the signup credits and a signup grant", async () => {
    const user = await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    expect(user).toEqual({
      userId: ALICE,
      credits: 10,
      plan: "free",
      createdAt: expect.any(Number),
      updatedAt: user.createdAt,
      signupGrant: 10,
    });
    const rows = await ledger();
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ userId: ALICE, kind: "grant", amount: 10, reason: "signup" });
    expect(rows[0].jobId).toBeUndefined();
  });

  test("returns an existing user unchanged", async () => {
    const first = await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      ...NEW_USER,
    });
    const again = await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      signupCredits: 99,
      plan: "pro",
    });
    // Granted nothing this time: the gateway counts a signup grant once.
    expect(again).toEqual({ ...first, signupGrant: 0 });
    expect(await ledger()).toHaveLength(1);
  });

  test("writes no ledger row when signup credits are zero", async () => {
    const user = await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      signupCredits: 0,
      plan: "free",
    });
    expect(user).toMatchObject({ credits: 0, signupGrant: 0 });
    expect(await ledger()).toEqual([]);
  });

  test("refuses negative signup credits", async () => {
    await refusal(
      t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, signupCredits: -1, plan: "x" }),
      "INVALID_REQUEST",
    );
    expect(await credits(ALICE)).toBeUndefined();
  });
});

describe("getUser", () => {
  test("returns an existing user as stored, without a signup grant", async () => {
    const { signupGrant, ...created } = await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      ...NEW_USER,
    });
    expect(signupGrant).toBe(NEW_USER.signupCredits);
    await t.mutation(internal.gateway.grantCredits, {
      userId: ALICE,
      amount: 5,
      reason: "support",
      ...NEW_USER,
    });
    const found = await t.query(internal.gateway.getUser, { userId: ALICE });
    // The current balance, and no `signupGrant` key: a read grants nothing.
    expect(found).toEqual({ ...created, credits: 15, updatedAt: expect.any(Number) });
  });

  test("returns null for a missing user and creates nothing", async () => {
    expect(await t.query(internal.gateway.getUser, { userId: ALICE })).toBeNull();
    expect(await credits(ALICE)).toBeUndefined();
    expect(await ledger()).toEqual([]);
  });

  test("never answers with another user's record", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    expect(await t.query(internal.gateway.getUser, { userId: BOB })).toBeNull();
    await t.mutation(internal.gateway.getOrCreateUser, {
      userId: BOB,
      signupCredits: 3,
      plan: "pro",
    });
    const bob = await t.query(internal.gateway.getUser, { userId: BOB });
    expect(bob).toMatchObject({ userId: BOB, credits: 3, plan: "pro" });
  });

  test("matches the user id exactly", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    for (const near of ["", "user_", "USER_ALICE", `${ALICE} `, `${ALICE}x`]) {
      expect(await t.query(internal.gateway.getUser, { userId: near })).toBeNull();
    }
  });
});

describe("grantCredits", () => {
  test("adds credits to an existing user with a grant row", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    const user = await t.mutation(internal.gateway.grantCredits, {
      userId: ALICE,
      amount: 25,
      reason: "purchase",
      ...NEW_USER,
    });
    expect(user).toMatchObject({ credits: 35, signupGrant: 0 });
    const grants = (await ledger()).filter((row) => row.reason === "purchase");
    expect(grants).toMatchObject([{ userId: ALICE, kind: "grant", amount: 25 }]);
  });

  test("creates the user first when needed", async () => {
    const user = await t.mutation(internal.gateway.grantCredits, {
      userId: BOB,
      amount: 5,
      reason: "promo",
      ...NEW_USER,
    });
    expect(user).toMatchObject({ userId: BOB, credits: 15, plan: "free", signupGrant: 10 });
    expect((await ledger()).map((row) => row.reason).sort()).toEqual(["promo", "signup"]);
  });

  test.each([-5, 1.5])("refuses amount %s and commits nothing", async (amount) => {
    await refusal(
      t.mutation(internal.gateway.grantCredits, {
        userId: ALICE,
        amount,
        reason: "x",
        ...NEW_USER,
      }),
      "INVALID_REQUEST",
    );
    expect(await credits(ALICE)).toBeUndefined();
    expect(await ledger()).toEqual([]);
  });
});

describe("chargeAndCreateJob", () => {
  test("creates a submitting job, deducts its cost and writes a charge row", async () => {
    const job = await charge("job_1");
    expect(job).toEqual({
      ...newJob("job_1"),
      status: "submitting",
      runpodId: null,
      errorCode: null,
      errorDetail: null,
      downloadUrl: null,
      downloadExpiresAt: null,
      idempotencyKey: null,
      createdAt: expect.any(Number),
      updatedAt: job.createdAt,
      checkedAt: job.createdAt,
      progress: null,
      stage: null,
      progressWrittenAt: null,
      posterKey: null,
      posterUrl: null,
      deletedAt: null,
      signupGrant: 10,
    });
    expect(await credits(ALICE)).toBe(7);
    const charges = (await ledger()).filter((row) => row.kind === "charge");
    expect(charges).toMatchObject([{ userId: ALICE, jobId: "job_1", amount: 3, reason: "job" }]);
  });

  test("keeps the image url", async () => {
    const job = await t.mutation(internal.gateway.chargeAndCreateJob, {
      job: { ...newJob("job_1"), imageUrl: "https://images.example.com/a.png" },
      maxActive: 5,
      ...NEW_USER,
    });
    expect(job.imageUrl).toBe("https://images.example.com/a.png");
  });

  test("a zero-cost job needs no credits", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      signupCredits: 0,
      plan: "free",
    });
    const job = await charge("job_free", { cost: 0 });
    expect(job.cost).toBe(0);
    expect(await credits(ALICE)).toBe(0);
  });

  test("refuses when credits are short and leaves the balance and jobs alone", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    const data = await refusal(charge("job_1", { cost: 11 }), "INSUFFICIENT_CREDITS");
    expect(data.message).toBe("This job costs 11 credits; you have 10");
    expect(await credits(ALICE)).toBe(10);
    expect(await jobCount()).toBe(0);
    expect(await ledger()).toHaveLength(1);
  });

  test("a refusal also rolls back the user it created", async () => {
    await refusal(charge("job_1", { cost: 11 }), "INSUFFICIENT_CREDITS");
    expect(await credits(ALICE)).toBeUndefined();
    expect(await ledger()).toEqual([]);
    // So the signup grant is still to come, and the call that makes it reports it.
    const user = await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    expect(user.signupGrant).toBe(10);
  });

  test("reports the signup grant on the charge that created the user only", async () => {
    expect((await charge("job_1")).signupGrant).toBe(10);
    expect((await charge("job_2")).signupGrant).toBe(0);
    const user = await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    expect(user.signupGrant).toBe(0);
  });

  test("reports no signup grant for a user created before", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, { userId: ALICE, ...NEW_USER });
    expect((await charge("job_1")).signupGrant).toBe(0);
  });

  test("refuses the job past the active limit; finished jobs do not count", async () => {
    await t.mutation(internal.gateway.grantCredits, {
      userId: ALICE,
      amount: 90,
      reason: "x",
      ...NEW_USER,
    });
    const limits = { maxActive: 3, ...NEW_USER };
    for (const jobId of ["a", "b", "c", "d", "e"]) {
      await t.mutation(internal.gateway.chargeAndCreateJob, { job: newJob(jobId), ...limits });
      if (jobId === "a") await setStatus("a", "done");
      if (jobId === "b") await setStatus("b", "failed");
    }
    await t.mutation(internal.gateway.recordRunpodId, { jobId: "c", runpodId: "rp_c" });
    await setStatus("d", "running");
    // Active now: c (queued), d (running), e (submitting).
    const before = await credits(ALICE);
    const data = await refusal(
      t.mutation(internal.gateway.chargeAndCreateJob, { job: newJob("f"), ...limits }),
      "TOO_MANY_ACTIVE_JOBS",
    );
    expect(data.message).toBe("You already have 3 jobs queued or running");
    expect(await credits(ALICE)).toBe(before);
    expect(await jobCount()).toBe(5);
  });

  test("checks credits before the active limit", async () => {
    await t.mutation(internal.gateway.getOrCreateUser, {
      userId: ALICE,
      signupCredits: 0,
      plan: "free",
    });
    await refusal(
      t.mutation(internal.gateway.chargeAndCreateJob, {
        job: newJob("a"),
        maxActive: 0,
        ...NEW_USER,
      }),
      "INSUFFICIENT_CREDITS",
    );
  });

  test("refuses a duplicate job id without charging again", async () => {
    await charge("job_1");
    await refusal(charge("job_1"), "CONFLICT");
    expect(await credits(ALICE)).toBe(7);
    expect(await jobCount()).toBe(1);
    expect((await ledger()).filter((row) => row.kind === "charge")).toHaveLength(1);
  });

  test("refuses a negative or fractional cost", async () => {
    await refusal(charge("job_1", { cost: -1 }), "INVALID_REQUEST");
    await refusal(charge("job_2", { cost: 0.5 }), "INVALID_REQUEST");
    expect(await jobCount()).toBe(0);
  });

  test("validates its arguments", async () => {
    await expect(
      t.mutation(internal.gateway.chargeAndCreateJob, {
        job: { ...newJob("job_1"), cost: "3" as unknown as number },
        maxActive: 5,
        ...NEW_USER,
      }),
    ).rejects.toThrow(/Validator error/);
  });
});

describe("recordRunpodId", () => {
  test("remembers the RunPod id and moves a submitting job to queued", async () => {
    await charge("job_1");
    const job = await t.mutation(internal.gateway.recordRunpodId, {
      jobId: "job_1",
      runpodId: "rp_1",
    });
    expect(job).toMatchObject({ status: "queued", runpodId: "rp_1" });
  });

  test("keeps the first RunPod id and never moves a job back", async () => {
    await charge("job_1");
    await setStatus("job_1", "running", { runpodId: "rp_1" });
    const job = await t.mutation(internal.gateway.recordRunpodId, {
      jobId: "job_1",
      runpodId: "rp_2",
    });
    expect(job).toMatchObject({ status: "running", runpodId: "rp_1" });
  });

  test("refuses an unknown job", async () => {
    await refusal(
      t.mutation(internal.gateway.recordRunpodId, { jobId: "nope", runpodId: "rp_1" }),
      "NOT_FOUND",
    );
  });
});

describe("applyStatus", () => {
  test("moves a job forward and reports the change", async () => {
    await charge("job_1");
    const { job, changed } = await setStatus("job_1", "running");
    expect(changed).toBe(true);
    expect(job.status).toBe("running");
  });

  test.each<[JobStatus, JobStatus]>([
    ["running", "queued"],
    ["running", "running"],
    ["done", "failed"],
    ["failed", "done"],
    ["queued", "submitting"],
  ])("from %s to %s changes nothing", async (from, to) => {
    await charge("job_1");
    const before = (await setStatus("job_1", from)).job;
    const credited = await credits(ALICE);
    const rows = (await ledger()).length;
    const { job, changed } = await setStatus("job_1", to, { errorCode: "X" });
    expect(changed).toBe(false);
    expect(job).toEqual(before);
    expect(await credits(ALICE)).toBe(credited);
    expect(await ledger()).toHaveLength(rows);
  });

  test("a failure refunds exactly once", async () => {
    await charge("job_1");
    const first = await setStatus("job_1", "failed", {
      errorCode: "RUNPOD_FAILED",
      errorDetail: "out of memory",
    });
    expect(first.changed).toBe(true);
    expect(first.job).toMatchObject({
      status: "failed",
      errorCode: "RUNPOD_FAILED",
      errorDetail: "out of memory",
    });
    const second = await setStatus("job_1", "failed", { errorCode: "AGAIN" });
    expect(second.changed).toBe(false);
    expect((await setStatus("job_1", "canceled")).changed).toBe(false);
    expect(await credits(ALICE)).toBe(10);
    const refunds = (await ledger()).filter((row) => row.kind === "refund");
    expect(refunds).toMatchObject([{ jobId: "job_1", amount: 3, reason: "failed" }]);
  });

  test("a move to canceled refunds with reason canceled", async () => {
    await charge("job_1");
    await setStatus("job_1", "canceled");
    expect(await credits(ALICE)).toBe(10);
    const refunds = (await ledger()).filter((row) => row.kind === "refund");
    expect(refunds).toMatchObject([{ jobId: "job_1", amount: 3, reason: "canceled" }]);
  });

  test("a zero-cost failure still writes its refund row", async () => {
    await charge("job_1", { cost: 0 });
    await setStatus("job_1", "failed");
    const refunds = (await ledger()).filter((row) => row.kind === "refund");
    expect(refunds).toMatchObject([{ jobId: "job_1", amount: 0 }]);
    expect(await credits(ALICE)).toBe(10);
  });

  test("done refunds nothing", async () => {
    await charge("job_1");
    await setStatus("job_1", "done");
    expect(await credits(ALICE)).toBe(7);
    expect((await ledger()).filter((row) => row.kind === "refund")).toEqual([]);
  });

  test("never refunds a job that already has a refund row", async () => {
    await charge("job_1");
    await t.run(async (ctx) => {
      await ctx.db.insert("ledger", {
        userId: ALICE,
        jobId: "job_1",
        kind: "refund",
        amount: 3,
        reason: "manual",
        createdAt: 0,
      });
    });
    const { job, changed } = await setStatus("job_1", "failed");
    expect(changed).toBe(true);
    expect(job.status).toBe("failed");
    expect(await credits(ALICE)).toBe(7);
    expect((await ledger()).filter((row) => row.kind === "refund")).toHaveLength(1);
  });

  test("sets a missing RunPod id but keeps an existing one", async () => {
    await charge("job_1");
    expect((await setStatus("job_1", "queued", { runpodId: "rp_1" })).job.runpodId).toBe("rp_1");
    expect((await setStatus("job_1", "running", { runpodId: "rp_2" })).job.runpodId).toBe("rp_1");
  });

  test("replaces the error fields on each move, like store.py", async () => {
    await charge("job_1");
    await setStatus("job_1", "queued", { errorCode: "SLOW", errorDetail: "retrying" });
    const { job } = await setStatus("job_1", "running", { errorCode: null });
    expect(job).toMatchObject({ errorCode: null, errorDetail: null });
  });

  test("refuses an unknown job", async () => {
    await refusal(setStatus("nope", "running"), "NOT_FOUND");
  });

  test("refuses an unknown status", async () => {
    await charge("job_1");
    await expect(setStatus("job_1", "exploded" as JobStatus)).rejects.toThrow(/Validator error/);
  });
});

describe("recordProgress", () => {
  const T0 = 1_800_000_000_000;
  const report = (progress: number, stage: "started" | "generating" | "uploading", now: number) =>
    t.mutation(internal.gateway.recordProgress, { jobId: "job_1", progress, stage, now });

  test("the first report runs the job; a report within the second and stage is not written", async () => {
    await charge("job_1");
    const first = await report(0.1, "generating", T0);
    expect(first.written).toBe(true);
    expect(first.job).toMatchObject({ status: "running", progress: 0.1, stage: "generating" });
    expect(first.job.progressWrittenAt).toBe(T0);
    // The deployment's clock for the change, and the reconciler's mark left alone.
    expect(first.job.updatedAt).toBeGreaterThanOrEqual(first.job.createdAt);
    expect(first.job.checkedAt).toBe(first.job.createdAt);
    const soon = await report(0.5, "generating", T0 + 999);
    expect(soon).toEqual({ job: first.job, written: false });
    const stage = await report(0.8, "uploading", T0 + 1000 - 1);
    expect(stage.written).toBe(true);
    expect(stage.job).toMatchObject({ progress: 0.8, stage: "uploading" });
  });

  test.each([-0.01, 1.01, Infinity])("refuses progress %s", async (progress) => {
    await charge("job_1");
    await refusal(report(progress, "started", T0), "INVALID_REQUEST");
    const job = await t.query(internal.gateway.findJob, { jobId: "job_1" });
    expect(job?.progress).toBeNull();
  });

  test("refuses a stage the worker does not have", async () => {
    await charge("job_1");
    const call = t.mutation(internal.gateway.recordProgress, {
      jobId: "job_1",
      progress: 0.5,
      stage: "dancing" as "started",
      now: T0,
    });
    await expect(call).rejects.toThrow(/Validator|validator|stage/);
  });

  test("leaves a finished job alone, and an unknown job is NOT_FOUND", async () => {
    await charge("job_1");
    const done = (await setStatus("job_1", "done")).job;
    expect(await report(0.5, "uploading", T0)).toEqual({ job: done, written: false });
    await refusal(
      t.mutation(internal.gateway.recordProgress, {
        jobId: "job_nope",
        progress: 0,
        stage: "started",
        now: T0,
      }),
      "NOT_FOUND",
    );
  });
});

describe("cancelJob", () => {
  test("cancels the user's active job and refunds it", async () => {
    await charge("job_1");
    const job = await t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "job_1" });
    expect(job).toMatchObject({
      status: "canceled",
      errorCode: "CANCELED",
      errorDetail: "Canceled by the user",
    });
    expect(await credits(ALICE)).toBe(10);
    const refunds = (await ledger()).filter((row) => row.kind === "refund");
    expect(refunds).toMatchObject([{ jobId: "job_1", amount: 3, reason: "canceled" }]);
  });

  test("a later failure report neither changes nor refunds a canceled job", async () => {
    await charge("job_1");
    await t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "job_1" });
    expect((await setStatus("job_1", "failed")).changed).toBe(false);
    expect(await credits(ALICE)).toBe(10);
    expect((await ledger()).filter((row) => row.kind === "refund")).toHaveLength(1);
  });

  test("another user's job is not found and stays as it was", async () => {
    await charge("job_1");
    await refusal(
      t.mutation(internal.gateway.cancelJob, { userId: BOB, jobId: "job_1" }),
      "NOT_FOUND",
    );
    const job = await t.query(internal.gateway.findJob, { jobId: "job_1" });
    expect(job?.status).toBe("submitting");
    expect(await credits(ALICE)).toBe(7);
  });

  test("an unknown job is not found", async () => {
    await refusal(
      t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "nope" }),
      "NOT_FOUND",
    );
  });

  test.each<JobStatus>(["done", "failed", "canceled"])(
    "a %s job cannot be canceled",
    async (status) => {
      await charge("job_1");
      await setStatus("job_1", status);
      const balance = await credits(ALICE);
      const data = await refusal(
        t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "job_1" }),
        "JOB_NOT_CANCELABLE",
      );
      expect(data.message).toBe(`The job is already ${status}`);
      expect(await credits(ALICE)).toBe(balance);
    },
  );
});

describe("deleteJob", () => {
  const remove = (userId: string, jobId: string) =>
    t.mutation(internal.gateway.deleteJob, { userId, jobId });

  test.each<JobStatus>(["done", "failed", "canceled"])(
    "a %s job is gone for its owner, its ledger kept",
    async (status) => {
      await charge("job_1");
      await setStatus("job_1", status, { errorCode: "X", errorDetail: "the worker said so" });
      const rowsBefore = await ledger();
      const balance = await credits(ALICE);
      const deleted = await remove(ALICE, "job_1");
      expect(deleted).toMatchObject({ jobId: "job_1", status, prompt: "", imageUrl: null });
      expect(deleted).toMatchObject({ errorDetail: null, downloadUrl: null, cost: 3 });
      await refusal(
        t.query(internal.gateway.getJob, { userId: ALICE, jobId: "job_1" }),
        "NOT_FOUND",
      );
      await refusal(
        t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "job_1" }),
        "NOT_FOUND",
      );
      const listed = await t.query(internal.gateway.listJobs, {
        userId: ALICE,
        limit: 10,
        cursor: null,
      });
      expect(listed).toEqual({ jobs: [], nextCursor: null });
      expect(await ledger()).toEqual(rowsBefore);
      expect(await credits(ALICE)).toBe(balance);
      expect((await auditWalk()).problems).toEqual([]);
    },
  );

  test.each<JobStatus>(["submitting", "queued", "running"])(
    "a %s job is refused and unchanged",
    async (status) => {
      await charge("job_1");
      if (status !== "submitting") {
        await setStatus("job_1", status);
      }
      const before = await t.query(internal.gateway.findJob, { jobId: "job_1" });
      const data = await refusal(remove(ALICE, "job_1"), "JOB_NOT_DELETABLE");
      expect(data.message).toBe(
        `The job is still ${status === "submitting" ? "queued" : status}: cancel it first`,
      );
      expect(await t.query(internal.gateway.findJob, { jobId: "job_1" })).toEqual(before);
    },
  );

  test("another user's job and an unknown one are not found", async () => {
    await charge("job_1");
    await setStatus("job_1", "done");
    await refusal(remove(BOB, "job_1"), "NOT_FOUND");
    await refusal(remove(ALICE, "nope"), "NOT_FOUND");
    const job = await t.query(internal.gateway.getJob, { userId: ALICE, jobId: "job_1" });
    expect(job.prompt).toBe("A silver drone flies through a neon skyline");
  });

  test("a repeat returns the same tombstone and writes nothing", async () => {
    await charge("job_1");
    await setStatus("job_1", "done");
    const first = await remove(ALICE, "job_1");
    const again = await remove(ALICE, "job_1");
    expect(again).toEqual(first);
    await refusal(remove(BOB, "job_1"), "NOT_FOUND");
  });

  test("a page reads no deleted job, however many there are", async () => {
    // Five documents' room: stepping over the 200 tombstones would need 200 more. convex-test
    // counts a `paginate` page's returned documents only (0.0.60 `dist/index.js`, "1.0/queryPage"),
    // so the limit catches a `hasOlderJob` that scanned them; for the page itself, the last
    // check below shows the index range `listJobs` reads holds no tombstone at all.
    t = convexTest({ schema, modules, transactionLimits: { documentsRead: 5 } });
    await insertJob("old", ALICE, 1, { status: "done" });
    await t.run(async (ctx) => {
      for (let i = 0; i < 200; i++) {
        await ctx.db.insert("jobs", {
          ...newJob(`gone_${i}`),
          imageUrl: undefined,
          status: "done",
          createdAt: 10 + i,
          updatedAt: 10 + i,
          checkedAt: 10 + i,
          deletedAt: 10_000,
        });
      }
    });
    await insertJob("new", ALICE, 1_000, { status: "done" });
    const first = await t.query(internal.gateway.listJobs, {
      userId: ALICE,
      limit: 1,
      cursor: null,
    });
    expect(first.jobs.map((job) => job.jobId)).toEqual(["new"]);
    const second = await t.query(internal.gateway.listJobs, {
      userId: ALICE,
      limit: 1,
      cursor: first.nextCursor,
    });
    expect(second).toMatchObject({ jobs: [{ jobId: "old" }], nextCursor: null });
    const range = await t.run((ctx) =>
      ctx.db
        .query("jobs")
        .withIndex("by_user_live_created", (q) => q.eq("userId", ALICE).eq("deletedAt", undefined))
        .take(10),
    );
    expect(range.map((job) => job.jobId)).toEqual(["old", "new"]);
  });
});

describe("getJob", () => {
  test("returns the user's job", async () => {
    const created = await chargedRecord("job_1");
    expect(await t.query(internal.gateway.getJob, { userId: ALICE, jobId: "job_1" })).toEqual(
      created,
    );
  });

  test("another user's job is not found", async () => {
    await charge("job_1");
    const data = await refusal(
      t.query(internal.gateway.getJob, { userId: BOB, jobId: "job_1" }),
      "NOT_FOUND",
    );
    expect(data.message).toBe("Job not found");
  });

  test("an unknown job is not found", async () => {
    await refusal(t.query(internal.gateway.getJob, { userId: ALICE, jobId: "nope" }), "NOT_FOUND");
  });
});

describe("findJob and findJobByRunpodId", () => {
  test("find a job by its id or RunPod id", async () => {
    await charge("job_1");
    const job = await t.mutation(internal.gateway.recordRunpodId, {
      jobId: "job_1",
      runpodId: "rp_1",
    });
    expect(await t.query(internal.gateway.findJob, { jobId: "job_1" })).toEqual(job);
    expect(await t.query(internal.gateway.findJobByRunpodId, { runpodId: "rp_1" })).toEqual(job);
  });

  test("return null for unknown ids", async () => {
    await charge("job_1");
    expect(await t.query(internal.gateway.findJob, { jobId: "nope" })).toBeNull();
    expect(await t.query(internal.gateway.findJobByRunpodId, { runpodId: "nope" })).toBeNull();
  });
});

describe("listJobs", () => {
  async function list(userId: string, limit: number, cursor: string | null) {
    return await t.query(internal.gateway.listJobs, { userId, limit, cursor });
  }

  async function listAll(userId: string, limit: number) {
    const pages: string[][] = [];
    let cursor: string | null = null;
    do {
      const page: { jobs: { jobId: string }[]; nextCursor: string | null } = await list(
        userId,
        limit,
        cursor,
      );
      pages.push(page.jobs.map((job) => job.jobId));
      cursor = page.nextCursor;
    } while (cursor !== null && pages.length < 20);
    return pages;
  }

  test("pages through the user's jobs newest first", async () => {
    // Inserted out of order: the list follows createdAt, not insertion.
    for (const [jobId, createdAt] of [
      ["j3", 3000],
      ["j1", 1000],
      ["j5", 5000],
      ["j2", 2000],
      ["j4", 4000],
    ] as const) {
      await insertJob(jobId, ALICE, createdAt);
    }
    await insertJob("bob_1", BOB, 2500);
    expect(await listAll(ALICE, 2)).toEqual([["j5", "j4"], ["j3", "j2"], ["j1"]]);
  });

  test("a page that ends exactly at the last job has no next cursor", async () => {
    for (const [jobId, createdAt] of [
      ["j1", 1000],
      ["j2", 2000],
      ["j3", 3000],
      ["j4", 4000],
    ] as const) {
      await insertJob(jobId, ALICE, createdAt);
    }
    expect(await listAll(ALICE, 2)).toEqual([
      ["j4", "j3"],
      ["j2", "j1"],
    ]);
    const whole = await list(ALICE, 4, null);
    expect(whole.nextCursor).toBeNull();
  });

  test("jobs created in the same millisecond keep a stable order, newest insert first", async () => {
    for (const jobId of ["a", "b", "c", "d"]) {
      await insertJob(jobId, ALICE, 1000);
    }
    await insertJob("older", ALICE, 500);
    expect(await listAll(ALICE, 1)).toEqual([["d"], ["c"], ["b"], ["a"], ["older"]]);
    expect(await listAll(ALICE, 3)).toEqual([
      ["d", "c", "b"],
      ["a", "older"],
    ]);
  });

  test("returns full job records", async () => {
    const created = await chargedRecord("job_1");
    expect(await list(ALICE, 10, null)).toEqual({ jobs: [created], nextCursor: null });
  });

  test("a user without jobs gets an empty page", async () => {
    await charge("job_1");
    expect(await list(BOB, 10, null)).toEqual({ jobs: [], nextCursor: null });
  });

  test("another user's cursor shows none of their jobs", async () => {
    await insertJob("a1", ALICE, 1000);
    await insertJob("a2", ALICE, 2000);
    await insertJob("b1", BOB, 1500);
    const alicePage = await list(ALICE, 1, null);
    const bobPage = await list(BOB, 10, alicePage.nextCursor);
    expect(bobPage.jobs.every((job) => job.userId === BOB)).toBe(true);
  });

  test.each(["not-a-cursor", "%%%", "[1,2", "null", "123", "{}"])(
    "refuses the malformed cursor %s",
    async (cursor) => {
      await insertJob("a1", ALICE, 1000);
      await refusal(list(ALICE, 10, cursor), "INVALID_CURSOR");
    },
  );

  test("a read limit is not reported as a bad cursor", async () => {
    // The same functions with a 3-document read limit: the page of 5 jobs goes over it.
    t = convexTest({ schema, modules, transactionLimits: { documentsRead: 3 } });
    for (const jobId of ["a1", "a2", "a3", "a4", "a5"]) {
      await insertJob(jobId, ALICE, 1000);
    }
    const error = await list(ALICE, 10, null).then(
      () => null,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(Error);
    expect(error).not.toBeInstanceOf(ConvexError);
    expect((error as Error).message).toMatch(/Scanned too many documents/);
  });

  test("serves at most 100 jobs a page, however many are asked for", async () => {
    await t.run(async (ctx) => {
      for (let i = 0; i < 101; i++) {
        await ctx.db.insert("jobs", {
          ...newJob(`j${i}`),
          imageUrl: undefined,
          status: "done",
          createdAt: i,
          updatedAt: i,
          checkedAt: i,
        });
      }
    });
    const page = await list(ALICE, 1_000, null);
    expect(page.jobs).toHaveLength(100);
    expect((await list(ALICE, 1_000, page.nextCursor)).jobs.map((job) => job.jobId)).toEqual([
      "j0",
    ]);
  });

  test.each([0, -1, 2.5])("refuses limit %s", async (limit) => {
    await refusal(list(ALICE, limit, null), "INVALID_REQUEST");
  });
});

describe("saveDownloadUrl", () => {
  test("stores the url and its expiry without touching updatedAt", async () => {
    const created = await charge("job_1");
    const result = await t.mutation(internal.gateway.saveDownloadUrl, {
      jobId: "job_1",
      url: "https://r2.example.com/v.mp4?sig=1",
      expiresAt: 1_900_000_000_000,
    });
    expect(result).toBeNull();
    const job = await t.query(internal.gateway.findJob, { jobId: "job_1" });
    expect(job).toMatchObject({
      downloadUrl: "https://r2.example.com/v.mp4?sig=1",
      downloadExpiresAt: 1_900_000_000_000,
      updatedAt: created.updatedAt,
    });
  });

  test("ignores an unknown job", async () => {
    const result = await t.mutation(internal.gateway.saveDownloadUrl, {
      jobId: "nope",
      url: "https://r2.example.com/v.mp4",
      expiresAt: 1,
    });
    expect(result).toBeNull();
    expect(await jobCount()).toBe(0);
  });
});

describe("ping", () => {
  test("answers null", async () => {
    expect(await t.query(internal.gateway.ping, {})).toBeNull();
  });
});

describe("ledgerTotals", () => {
  test("sums grants, charges and refunds per user", async () => {
    await charge("a1"); // alice: signup 10, charge 3
    await charge("a2", { cost: 4 }); // charge 4
    await setStatus("a2", "failed"); // refund 4
    await t.mutation(internal.gateway.grantCredits, {
      userId: BOB,
      amount: 5,
      reason: "promo",
      ...NEW_USER,
    });
    await t.mutation(internal.gateway.getOrCreateUser, {
      userId: "user_carol",
      signupCredits: 0,
      plan: "free",
    });
    expect(await ledgerTotals()).toEqual([
      { userId: ALICE, credits: 7, grants: 10, charges: 7, refunds: 4 },
      { userId: BOB, credits: 15, grants: 15, charges: 0, refunds: 0 },
      { userId: "user_carol", credits: 0, grants: 0, charges: 0, refunds: 0 },
    ]);
  });

  test("every balance equals grants - charges + refunds", async () => {
    await charge("a1");
    await charge("a2");
    await t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "a2" });
    await charge("b1", { userId: BOB, cost: 10 });
    await setStatus("b1", "done");
    for (const row of (await ledgerTotals()) as {
      credits: number;
      grants: number;
      charges: number;
      refunds: number;
    }[]) {
      expect(row.credits).toBe(row.grants - row.charges + row.refunds);
    }
  });

  test("gives the same totals however the calls are cut, even inside one user's rows", async () => {
    await charge("a1");
    await charge("a2", { cost: 4 });
    await setStatus("a2", "failed");
    await charge("b1", { userId: BOB });
    await charge("c1", { userId: "user_carol" });
    const whole = await ledgerTotals();
    expect(whole.map((row) => (row as { userId: string }).userId)).toEqual([
      ALICE,
      BOB,
      "user_carol",
    ]);
    // 3 users and 8 ledger rows: every budget from 2 cuts the walk somewhere else.
    for (let maxReads = 2; maxReads <= 12; maxReads++) {
      expect(await ledgerTotals(maxReads)).toEqual(whole);
    }
  });

  test("refuses a cursor it did not hand out", async () => {
    for (const cursor of [
      "garbage",
      "{}",
      JSON.stringify({ phase: "jobs", after: null, inside: null }),
    ]) {
      await refusal(t.query(internal.gateway.ledgerTotals, { cursor }), "INVALID_CURSOR");
    }
  });
});

describe("checkedAt", () => {
  test("a changed status, a RunPod id and a cancel each mark the job checked", async () => {
    await charge("job_1");
    await charge("job_2");
    await charge("job_3");
    for (const jobId of ["job_1", "job_2", "job_3"]) {
      await patchJob(jobId, { checkedAt: 1000 });
    }
    const moved = (await setStatus("job_1", "running")).job;
    const queued = await t.mutation(internal.gateway.recordRunpodId, {
      jobId: "job_2",
      runpodId: "rp_2",
    });
    const canceled = await t.mutation(internal.gateway.cancelJob, {
      userId: ALICE,
      jobId: "job_3",
    });
    for (const job of [moved, queued, canceled]) {
      expect(job.checkedAt).toBeGreaterThan(1000);
      expect(job.checkedAt).toBe(job.updatedAt);
    }
  });

  test("a status that changes nothing leaves it alone", async () => {
    await charge("job_1");
    await setStatus("job_1", "running");
    await patchJob("job_1", { checkedAt: 1000 });
    const { job, changed } = await setStatus("job_1", "queued");
    expect(changed).toBe(false);
    expect(job.checkedAt).toBe(1000);
  });

  test("saving a download url leaves it alone", async () => {
    await charge("job_1");
    await patchJob("job_1", { checkedAt: 1000 });
    await t.mutation(internal.gateway.saveDownloadUrl, { jobId: "job_1", url: "u", expiresAt: 1 });
    expect((await t.query(internal.gateway.findJob, { jobId: "job_1" }))?.checkedAt).toBe(1000);
  });
});

describe("idempotency keys", () => {
  const KEY = "key-1";
  const TTL = 86_400_000;
  const STALE = 60_000;

  async function claim(now: number, fingerprint = "fp-a", userId = ALICE) {
    return await t.mutation(internal.gateway.claimIdempotencyKey, {
      userId,
      key: KEY,
      fingerprint,
      now,
      ttlMs: TTL,
      staleMs: STALE,
    });
  }

  async function complete(statusCode = 201, body: string | null = '{"jobId":"job_1"}') {
    return await t.mutation(internal.gateway.completeIdempotencyKey, {
      userId: ALICE,
      key: KEY,
      statusCode,
      body,
    });
  }

  async function records(): Promise<Doc<"idempotency">[]> {
    return await t.run((ctx) => ctx.db.query("idempotency").collect());
  }

  async function chargeWithKey(jobId: string, idempotencyKey: string | null, userId = ALICE) {
    return await t.mutation(internal.gateway.chargeAndCreateJob, {
      job: newJob(jobId, { userId }),
      maxActive: 5,
      idempotencyKey,
      ...NEW_USER,
    });
  }

  const claimed = { outcome: "claimed", statusCode: null, body: null, jobId: null };

  describe("claimIdempotencyKey", () => {
    test("claims an unused key with an in-flight record", async () => {
      expect(await claim(1000)).toEqual(claimed);
      expect(await records()).toMatchObject([
        {
          userId: ALICE,
          key: KEY,
          fingerprint: "fp-a",
          state: "in_flight",
          claimedAt: 1000,
          expiresAt: 1000 + TTL,
        },
      ]);
    });

    test("a second request while the first runs is told it is in flight", async () => {
      await claim(1000);
      expect(await claim(1000 + STALE - 1)).toEqual({
        outcome: "in_flight",
        statusCode: null,
        body: null,
        jobId: null,
      });
      expect((await records())[0].claimedAt).toBe(1000);
    });

    test("an in-flight request that has charged shows its job", async () => {
      await claim(1000);
      await chargeWithKey("job_1", KEY);
      expect(await claim(2000)).toMatchObject({ outcome: "in_flight", jobId: "job_1" });
    });

    test("refuses the key with another request and changes nothing", async () => {
      await claim(1000);
      const data = await refusal(claim(2000, "fp-b"), "IDEMPOTENCY_KEY_REUSED");
      expect(data.message).toBe("This Idempotency-Key was used with a different request");
      expect(await records()).toMatchObject([{ fingerprint: "fp-a", claimedAt: 1000 }]);
    });

    test("refuses another request even once the first is done", async () => {
      await claim(1000);
      await complete();
      await refusal(claim(2000, "fp-b"), "IDEMPOTENCY_KEY_REUSED");
    });

    test("keys belong to one user", async () => {
      await claim(1000);
      expect(await claim(1000, "fp-b", BOB)).toEqual(claimed);
      expect(await records()).toHaveLength(2);
    });

    test("replays a done request's response", async () => {
      await claim(1000);
      await chargeWithKey("job_1", KEY);
      await complete(201, '{"jobId":"job_1"}');
      expect(await claim(5000)).toEqual({
        outcome: "replay",
        statusCode: 201,
        body: '{"jobId":"job_1"}',
        jobId: "job_1",
      });
    });

    test("replays a response without a body or job", async () => {
      await claim(1000);
      await complete(204, null);
      // Long after staleMs: a done record is replayed, never taken over.
      expect(await claim(1000 + STALE * 10)).toEqual({
        outcome: "replay",
        statusCode: 204,
        body: null,
        jobId: null,
      });
    });

    test("takes over a dead request that charged nothing", async () => {
      await claim(1000);
      expect(await claim(1000 + STALE)).toEqual(claimed);
      const [record] = await records();
      expect(record).toMatchObject({ state: "in_flight", claimedAt: 1000 + STALE });
      // The takeover is a fresh claim: a third request now finds it in flight.
      expect((await claim(1000 + STALE + 1)).outcome).toBe("in_flight");
    });

    test("takes over a dead request that charged, and shows its job", async () => {
      await claim(1000);
      await chargeWithKey("job_1", KEY);
      expect(await claim(1000 + STALE)).toEqual({ ...claimed, jobId: "job_1" });
      expect((await records())[0].jobId).toBe("job_1");
    });

    test("an expired record starts over, with any request", async () => {
      await claim(1000);
      await chargeWithKey("job_1", KEY);
      await complete();
      const later = 1000 + TTL;
      expect(await claim(later, "fp-b")).toEqual(claimed);
      const [record] = await records();
      expect(record).toMatchObject({
        fingerprint: "fp-b",
        state: "in_flight",
        claimedAt: later,
        expiresAt: later + TTL,
      });
      expect(record.jobId).toBeUndefined();
      expect(record.statusCode).toBeUndefined();
      expect(record.body).toBeUndefined();
      expect(await records()).toHaveLength(1);
    });

    test.each([
      { ttlMs: 0, staleMs: 1 },
      { ttlMs: 1.5, staleMs: 1 },
      { ttlMs: 1, staleMs: -1 },
    ])("refuses %o", async (limits) => {
      await refusal(
        t.mutation(internal.gateway.claimIdempotencyKey, {
          userId: ALICE,
          key: KEY,
          fingerprint: "fp-a",
          now: 1000,
          ...limits,
        }),
        "INVALID_REQUEST",
      );
      expect(await records()).toEqual([]);
    });
  });

  describe("completeIdempotencyKey", () => {
    test("marks the record done with its response", async () => {
      await claim(1000);
      expect(await complete(402, '{"code":"INSUFFICIENT_CREDITS"}')).toBeNull();
      expect(await records()).toMatchObject([
        { state: "done", statusCode: 402, body: '{"code":"INSUFFICIENT_CREDITS"}' },
      ]);
    });

    test("does nothing for a record that is gone", async () => {
      expect(await complete()).toBeNull();
      expect(await records()).toEqual([]);
    });
  });

  describe("releaseIdempotencyKey", () => {
    const release = (userId = ALICE) =>
      t.mutation(internal.gateway.releaseIdempotencyKey, { userId, key: KEY });

    test("deletes an in-flight record so the key can be used again", async () => {
      await claim(1000);
      expect(await release()).toBeNull();
      expect(await records()).toEqual([]);
      expect(await claim(1001, "fp-b")).toEqual(claimed);
    });

    test("keeps a done record", async () => {
      await claim(1000);
      await complete();
      await release();
      expect(await records()).toMatchObject([{ state: "done" }]);
    });

    test("leaves other users' records and unknown keys alone", async () => {
      await claim(1000);
      expect(await release(BOB)).toBeNull();
      expect(await records()).toHaveLength(1);
    });
  });

  describe("purgeIdempotencyKeys", () => {
    const purge = (before: number, limit: number) =>
      t.mutation(internal.gateway.purgeIdempotencyKeys, { before, limit });

    beforeEach(async () => {
      for (const expiresAt of [400, 100, 300, 200]) {
        await t.run(async (ctx) => {
          await ctx.db.insert("idempotency", {
            userId: ALICE,
            key: `k${expiresAt}`,
            fingerprint: "fp",
            state: "done",
            claimedAt: 0,
            expiresAt,
          });
        });
      }
    });

    const remaining = async () => (await records()).map((r) => r.expiresAt).sort();

    test("deletes the records that expired before `before`, soonest first", async () => {
      expect(await purge(300, 1)).toBe(1);
      expect(await remaining()).toEqual([200, 300, 400]);
      expect(await purge(300, 10)).toBe(1);
      expect(await remaining()).toEqual([300, 400]);
      expect(await purge(300, 10)).toBe(0);
    });

    test("deletes at most `limit`", async () => {
      expect(await purge(1000, 3)).toBe(3);
      expect(await remaining()).toEqual([400]);
    });

    test.each([0, -1, 1.5])("refuses limit %s", async (limit) => {
      await refusal(purge(1000, limit), "INVALID_REQUEST");
      expect(await records()).toHaveLength(4);
    });
  });

  describe("chargeAndCreateJob with a key", () => {
    test("keeps the key on the job and links the user's record to it", async () => {
      await claim(1000);
      await claim(1000, "fp-b", BOB);
      const job = await chargeWithKey("job_1", KEY);
      expect(job.idempotencyKey).toBe(KEY);
      const byUser = Object.fromEntries((await records()).map((r) => [r.userId, r.jobId]));
      expect(byUser).toEqual({ [ALICE]: "job_1", [BOB]: undefined });
    });

    test("creates the job when the key has no record", async () => {
      const job = await chargeWithKey("job_1", KEY);
      expect(job.idempotencyKey).toBe(KEY);
      expect(await records()).toEqual([]);
    });

    test("a null key is no key", async () => {
      await claim(1000);
      const job = await chargeWithKey("job_1", null);
      expect(job.idempotencyKey).toBeNull();
      expect((await records())[0].jobId).toBeUndefined();
    });

    test("a refused charge links nothing", async () => {
      await claim(1000);
      await t.mutation(internal.gateway.getOrCreateUser, {
        userId: ALICE,
        signupCredits: 0,
        plan: "free",
      });
      await refusal(chargeWithKey("job_1", KEY), "INSUFFICIENT_CREDITS");
      expect((await records())[0].jobId).toBeUndefined();
    });
  });
});

describe("the reconciler's claims", () => {
  beforeEach(async () => {
    for (const [jobId, status, checkedAt] of [
      ["queued_300", "queued", 300],
      ["running_100", "running", 100],
      ["submitting_200", "submitting", 200],
      ["done_50", "done", 50],
      ["failed_60", "failed", 60],
      ["canceled_70", "canceled", 70],
      ["queued_fresh", "queued", 5000],
      ["running_edge", "running", 1000],
    ] as const) {
      await insertJob(jobId, ALICE, 10, { status, checkedAt });
    }
  });

  async function claimStale(staleBefore: number, now: number, limit: number) {
    return await t.mutation(internal.gateway.claimStaleJobs, { staleBefore, now, limit });
  }

  async function checkedAt(jobId: string) {
    return (await t.query(internal.gateway.findJob, { jobId }))?.checkedAt;
  }

  describe("claimStaleJobs", () => {
    test("claims the active jobs checked before staleBefore, oldest first", async () => {
      const jobs = await claimStale(1000, 2000, 10);
      expect(jobs.map((job) => job.jobId)).toEqual(["running_100", "submitting_200", "queued_300"]);
      expect(jobs.every((job) => job.checkedAt === 2000 && job.updatedAt === 10)).toBe(true);
      for (const jobId of ["done_50", "failed_60", "canceled_70", "queued_fresh", "running_edge"]) {
        expect(await checkedAt(jobId)).not.toBe(2000);
      }
    });

    test("claims at most `limit`, the oldest, and leaves the rest for the next call", async () => {
      const first = await claimStale(1000, 2000, 2);
      expect(first.map((job) => job.jobId)).toEqual(["running_100", "submitting_200"]);
      expect(await checkedAt("queued_300")).toBe(300);
      const next = await claimStale(1000, 2001, 2);
      expect(next.map((job) => job.jobId)).toEqual(["queued_300"]);
    });

    test("a second call right after finds nothing: the first one's claims look fresh", async () => {
      const staleMs = 1500; // every job checked before 500 is stale
      expect(await claimStale(2000 - staleMs, 2000, 10)).toHaveLength(3);
      expect(await claimStale(2001 - staleMs, 2001, 10)).toEqual([]);
    });

    test("returns full job records", async () => {
      const [job] = await claimStale(150, 2000, 10);
      expect(job).toEqual(await t.query(internal.gateway.findJob, { jobId: "running_100" }));
    });

    test.each([0, -1, 1.5])("refuses limit %s", async (limit) => {
      await refusal(claimStale(1000, 2000, limit), "INVALID_REQUEST");
      expect(await checkedAt("running_100")).toBe(100);
    });
  });

  describe("claimJobCheck", () => {
    const claimOne = (jobId: string, staleBefore = 1000, now = 2000) =>
      t.mutation(internal.gateway.claimJobCheck, { jobId, staleBefore, now });

    test("claims a stale active job once", async () => {
      const job = await claimOne("queued_300");
      expect(job).toMatchObject({ jobId: "queued_300", status: "queued", checkedAt: 2000 });
      expect(await claimOne("queued_300", 1001, 2001)).toBeNull();
      expect(await checkedAt("queued_300")).toBe(2000);
    });

    test.each(["queued_fresh", "running_edge", "done_50", "failed_60", "canceled_70", "nope"])(
      "returns null for %s and changes nothing",
      async (jobId) => {
        const before = await checkedAt(jobId);
        expect(await claimOne(jobId)).toBeNull();
        expect(await checkedAt(jobId)).toBe(before);
      },
    );
  });
});

describe("audit", () => {
  async function audit() {
    return (await auditWalk()).problems;
  }

  async function addLedgerRow(jobId: string, kind: "charge" | "refund", amount = 0) {
    await t.run(async (ctx) => {
      await ctx.db.insert("ledger", {
        userId: ALICE,
        jobId,
        kind,
        amount,
        reason: "x",
        createdAt: 0,
      });
    });
  }

  beforeEach(async () => {
    await charge("job_done");
    await setStatus("job_done", "done");
    await charge("job_failed");
    await setStatus("job_failed", "failed");
    await charge("job_canceled");
    await t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "job_canceled" });
    await charge("job_free", { cost: 0 });
    await setStatus("job_free", "failed");
    await charge("job_running", { userId: BOB });
    await setStatus("job_running", "running");
    await t.mutation(internal.gateway.grantCredits, {
      userId: "user_carol",
      amount: 5,
      reason: "promo",
      ...NEW_USER,
    });
  });

  test("finds nothing wrong with books kept by the gateway's functions", async () => {
    expect(await audit()).toEqual([]);
  });

  test("finds a balance that does not match the ledger", async () => {
    await t.run(async (ctx) => {
      const user = await ctx.db
        .query("users")
        .withIndex("by_userId", (q) => q.eq("userId", ALICE))
        .unique();
      await ctx.db.patch("users", user!._id, { credits: 99 });
    });
    expect(await audit()).toEqual([`${ALICE}: balance 99 != grants 10 - charges 9 + refunds 6`]);
  });

  test("finds a job charged twice, or never", async () => {
    await addLedgerRow("job_done", "charge");
    await insertJob("job_uncharged", ALICE, 10);
    expect(await audit()).toEqual(["job_done: 2 charges", "job_uncharged: 0 charges"]);
  });

  test("finds a failed job without its refund", async () => {
    await charge("job_lost", { userId: BOB });
    await patchJob("job_lost", { status: "failed" });
    expect(await audit()).toEqual(["job_lost (failed): 0 refunds"]);
  });

  test("finds a job refunded twice, and a refund that should not exist", async () => {
    await addLedgerRow("job_canceled", "refund");
    await addLedgerRow("job_done", "refund");
    await addLedgerRow("job_running", "refund");
    expect(await audit()).toEqual([
      "job_canceled (canceled): 2 refunds",
      "job_done (done): 1 refunds",
      "job_running (running): 1 refunds",
    ]);
  });

  test("lists every problem, users first", async () => {
    await patchJob("job_failed", { status: "done" });
    await t.run(async (ctx) => {
      const user = await ctx.db
        .query("users")
        .withIndex("by_userId", (q) => q.eq("userId", BOB))
        .unique();
      await ctx.db.patch("users", user!._id, { credits: 0 });
    });
    expect(await audit()).toEqual([
      `${BOB}: balance 0 != grants 10 - charges 3 + refunds 0`,
      "job_failed (done): 1 refunds",
    ]);
  });

  test("finds the same problems however the calls are cut", async () => {
    await addLedgerRow("job_done", "charge");
    await addLedgerRow("job_running", "refund");
    await patchJob("job_failed", { status: "done" });
    const { problems, calls } = await auditWalk();
    expect(calls).toBe(2); // the users, then the jobs
    expect(problems).toEqual([
      "job_done: 2 charges",
      "job_failed (done): 1 refunds",
      "job_running (running): 1 refunds",
    ]);
    for (let maxReads = 2; maxReads <= 20; maxReads++) {
      expect((await auditWalk(maxReads)).problems).toEqual(problems);
    }
  });

  test("refuses a cursor it did not hand out", async () => {
    await refusal(t.query(internal.gateway.audit, { cursor: "[1]" }), "INVALID_CURSOR");
  });
});

describe("isInvalidCursor", () => {
  // Errors as a deployment throws them into `paginate()`: each message and data is the backend's
  // own (convex-backend `crates/database/src/query/mod.rs` `invalid_cursor`,
  // `crates/keybroker/src/broker.rs`, `crates/database/src/reads.rs`).
  const otherQuery = Object.assign(
    new Error(
      "InvalidCursor: Tried to run a query starting from a cursor, but it looks like this " +
        "cursor is from a different query.",
    ),
    { data: { isConvexSystemError: true, paginationError: "InvalidCursor" } },
  );

  test.each([
    ["a cursor of another query", otherQuery],
    ["a cursor that does not decrypt", new Error("Failed to parse cursor")],
    ["another deployment's cursor", new Error('Key is invalid for instance "other-123"')],
    ["a cursor without a position", new Error("Missing position field")],
  ])("recognizes %s", (_name, error) => {
    expect(isInvalidCursor(error)).toBe(true);
  });

  test.each([
    "Too many documents read in a single function execution (limit: 32000). Consider using smaller limits in your queries, paginating your queries, or using indexed queries with a selective index range expressions.",
    "Too many bytes read in a single function execution (limit: 16777216 bytes).",
    "Too many reads in a single function execution (limit: 4096).",
    "Requested too many items: 100000",
    "Server Error",
  ])("passes over %s", (message) => {
    expect(isInvalidCursor(new Error(message))).toBe(false);
  });

  test("passes over what is not an Error", () => {
    expect(isInvalidCursor("InvalidCursor")).toBe(false);
  });
});

describe("the audit walk's byte budget", () => {
  test("pages large documents so that no call reads more than the limit", async () => {
    // 40 jobs and 40 ledger rows of about 400 KB each: 32 MB, twice what one call may read.
    const big = "x".repeat(400_000);
    await t.run(async (ctx) => {
      await ctx.db.insert("users", {
        userId: ALICE,
        credits: 0,
        plan: "free",
        createdAt: 0,
        updatedAt: 0,
      });
    });
    for (let i = 0; i < 40; i++) {
      const jobId = `job_${String(i).padStart(2, "0")}`;
      await t.run(async (ctx) => {
        await ctx.db.insert("jobs", {
          ...newJob(jobId, { cost: 0 }),
          imageUrl: undefined,
          prompt: big,
          status: "done",
          createdAt: i,
          updatedAt: i,
          checkedAt: i,
        });
        await ctx.db.insert("ledger", {
          userId: ALICE,
          jobId,
          kind: "charge",
          amount: 0,
          reason: big,
          createdAt: i,
        });
      });
    }
    const { problems, calls } = await auditWalk();
    expect(problems).toEqual([]);
    expect(calls).toBeGreaterThanOrEqual(6); // 8 MiB a call: 2+ for the users, 4+ for the jobs
    expect(await ledgerTotals()).toEqual([
      { userId: ALICE, credits: 0, grants: 0, charges: 0, refunds: 0 },
    ]);
  });
});
