/**
 * The functions the Python gateway calls with its deploy key (`convex_client.py`).
 *
 * Each one is one `Store` method of `store.py`, with the same semantics as `SQLiteStore`: every
 * rule about money or limits is one mutation, so a check and the write that depends on it are one
 * serializable transaction, and a throw commits nothing. All are internal: browsers cannot call
 * them, only holders of a deploy key.
 */
import { getDocumentSize, v, type Value } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import {
  internalMutation,
  internalQuery,
  type MutationCtx,
  type QueryCtx,
} from "./_generated/server";
import {
  ACTIVE_STATUSES,
  MAX_UPDATED_JOBS,
  REFUNDED_STATUSES,
  STATUS_RANK,
  clampPageSize,
  fail,
  isInvalidCursor,
  isTerminal,
  jobRecord,
  nullableString,
  publicStatus,
  requireWhole,
  toJob,
  toUser,
  userRecord,
  type JobStatus,
} from "./model";
import { jobStatus } from "./schema";

type LedgerSums = { grant: number; charge: number; refund: number };

// The gateway's settings decide what a new user starts with; Convex has no copy of them.
const newUserArgs = { signupCredits: v.number(), plan: v.string() };

// What a call that may create the user adds to its answer: the signup credits it granted (0 when
// the user already existed), so the gateway can count each signup grant once. Never stored.
const signupGrant = { signupGrant: v.number() };

/** A user found or created here, and the signup credits its creation granted. */
type UserOrCreated = { user: Doc<"users">; signupGrant: number };

// --- helpers that run inside a transaction ----------------------------------------------------

async function findUser(ctx: QueryCtx, userId: string): Promise<Doc<"users"> | null> {
  return await ctx.db
    .query("users")
    .withIndex("by_userId", (q) => q.eq("userId", userId))
    .unique();
}

async function userOrCreate(
  ctx: MutationCtx,
  userId: string,
  signupCredits: number,
  plan: string,
): Promise<UserOrCreated> {
  const existing = await findUser(ctx, userId);
  if (existing !== null) {
    return { user: existing, signupGrant: 0 };
  }
  requireWhole("signupCredits", signupCredits);
  const now = Date.now();
  const id = await ctx.db.insert("users", {
    userId,
    credits: signupCredits,
    plan,
    createdAt: now,
    updatedAt: now,
  });
  if (signupCredits > 0) {
    await writeLedger(ctx, { userId, kind: "grant", amount: signupCredits, reason: "signup" });
  }
  return { user: (await ctx.db.get("users", id))!, signupGrant: signupCredits };
}

async function writeLedger(
  ctx: MutationCtx,
  row: Omit<Doc<"ledger">, "_id" | "_creationTime" | "createdAt">,
): Promise<void> {
  await ctx.db.insert("ledger", { ...row, createdAt: Date.now() });
}

async function addCredits(ctx: MutationCtx, userId: string, delta: number): Promise<void> {
  const user = (await findUser(ctx, userId))!;
  await ctx.db.patch("users", user._id, {
    credits: user.credits + delta,
    updatedAt: Date.now(),
  });
}

async function findJobDoc(ctx: QueryCtx, jobId: string): Promise<Doc<"jobs"> | null> {
  return await ctx.db
    .query("jobs")
    .withIndex("by_jobId", (q) => q.eq("jobId", jobId))
    .unique();
}

async function jobOrNotFound(ctx: QueryCtx, jobId: string): Promise<Doc<"jobs">> {
  const job = await findJobDoc(ctx, jobId);
  if (job === null) {
    throw fail("NOT_FOUND", "Job not found");
  }
  return job;
}

/** Give a failed or canceled job's credits back, at most once per job. */
async function refund(ctx: MutationCtx, job: Doc<"jobs">, reason: string): Promise<void> {
  const earlier = await ctx.db
    .query("ledger")
    .withIndex("by_job_kind", (q) => q.eq("jobId", job.jobId).eq("kind", "refund"))
    .first();
  if (earlier !== null) {
    return;
  }
  // A zero-cost job still gets its refund row: the audit expects one per failed job.
  await addCredits(ctx, job.userId, job.cost);
  await writeLedger(ctx, {
    userId: job.userId,
    jobId: job.jobId,
    kind: "refund",
    amount: job.cost,
    reason,
  });
}

/**
 * How many of the user's jobs are queued or running, counting no further than `cap`.
 *
 * Bounded whatever the user's history: each status is its own `by_user_status` range, finished
 * jobs are in other ranges, and `take(cap)` stops each range at `cap` documents.
 */
async function countActiveJobs(ctx: QueryCtx, userId: string, cap: number): Promise<number> {
  let active = 0;
  for (const status of ACTIVE_STATUSES) {
    const jobs = await ctx.db
      .query("jobs")
      .withIndex("by_user_status", (q) => q.eq("userId", userId).eq("status", status))
      .take(cap - active);
    active += jobs.length;
    if (active >= cap) {
      break;
    }
  }
  return active;
}

/** True when the user has a live job after `last` in `by_user_live_created` descending order. */
async function hasOlderJob(ctx: QueryCtx, last: Doc<"jobs">): Promise<boolean> {
  const sameMillisecond = await ctx.db
    .query("jobs")
    .withIndex("by_user_live_created", (q) =>
      q
        .eq("userId", last.userId)
        .eq("deletedAt", undefined)
        .eq("createdAt", last.createdAt)
        .lt("_creationTime", last._creationTime),
    )
    .first();
  if (sameMillisecond !== null) {
    return true;
  }
  const earlier = await ctx.db
    .query("jobs")
    .withIndex("by_user_live_created", (q) =>
      q.eq("userId", last.userId).eq("deletedAt", undefined).lt("createdAt", last.createdAt),
    )
    .first();
  return earlier !== null;
}

async function findIdempotencyRecord(
  ctx: QueryCtx,
  userId: string,
  key: string,
): Promise<Doc<"idempotency"> | null> {
  return await ctx.db
    .query("idempotency")
    .withIndex("by_user_key", (q) => q.eq("userId", userId).eq("key", key))
    .unique();
}

/**
 * The most documents one batch call (reconciler claims, purge) handles, whatever it asks for:
 * 3 ranges of 1,000 read and 1,000 written stay far within the 32,000 read and 16,000 written
 * per function (limits.mdx). The gateway asks for 50 and 500 (`jobs.py`). Both calls promise
 * "up to `limit`", so fewer is an honest answer.
 */
const MAX_BATCH = 1_000;

/** The active jobs last checked before `staleBefore`, least recently checked first. */
async function staleActiveJobs(
  ctx: QueryCtx,
  staleBefore: number,
  limit: number,
): Promise<Doc<"jobs">[]> {
  const candidates: Doc<"jobs">[] = [];
  for (const status of ACTIVE_STATUSES) {
    // Each status's range is already in `checkedAt` order, so `limit` from each is enough;
    // bounded by `take`, however many jobs are stale.
    const jobs = await ctx.db
      .query("jobs")
      .withIndex("by_status_checked", (q) => q.eq("status", status).lt("checkedAt", staleBefore))
      .take(limit);
    candidates.push(...jobs);
  }
  candidates.sort((a, b) => a.checkedAt - b.checkedAt || a._creationTime - b._creationTime);
  return candidates.slice(0, limit);
}

/** Claim a job for one reconciler: checked now, so every other instance sees it as fresh. */
async function claimCheck(ctx: MutationCtx, job: Doc<"jobs">, now: number) {
  await ctx.db.patch("jobs", job._id, { checkedAt: now });
  return toJob((await ctx.db.get("jobs", job._id))!);
}

// --- users and credits ------------------------------------------------------------------------

/**
 * The user, or null if they have none yet. The gateway calls this before `getOrCreateUser`:
 * nearly every call finds the user, and a query takes no mutation slot, runs no OCC and may be
 * retried. It grants nothing, so it carries no `signupGrant`.
 */
export const getUser = internalQuery({
  args: { userId: v.string() },
  returns: v.union(userRecord, v.null()),
  handler: async (ctx, { userId }) => {
    const user = await findUser(ctx, userId);
    return user === null ? null : toUser(user);
  },
});

export const getOrCreateUser = internalMutation({
  args: { userId: v.string(), ...newUserArgs },
  returns: userRecord.extend(signupGrant),
  handler: async (ctx, { userId, signupCredits, plan }) => {
    const { user, signupGrant } = await userOrCreate(ctx, userId, signupCredits, plan);
    return { ...toUser(user), signupGrant };
  },
});

export const grantCredits = internalMutation({
  args: { userId: v.string(), amount: v.number(), reason: v.string(), ...newUserArgs },
  returns: userRecord.extend(signupGrant),
  handler: async (ctx, { userId, amount, reason, signupCredits, plan }) => {
    requireWhole("amount", amount);
    const { signupGrant } = await userOrCreate(ctx, userId, signupCredits, plan);
    await addCredits(ctx, userId, amount);
    await writeLedger(ctx, { userId, kind: "grant", amount, reason });
    return { ...toUser((await findUser(ctx, userId))!), signupGrant };
  },
});

// --- jobs -------------------------------------------------------------------------------------

export const chargeAndCreateJob = internalMutation({
  args: {
    job: v.object({
      jobId: v.string(),
      userId: v.string(),
      prompt: v.string(),
      imageUrl: nullableString,
      durationSec: v.number(),
      seed: v.number(),
      cost: v.number(),
      objectKey: v.string(),
    }),
    maxActive: v.number(),
    // The request's Idempotency-Key: kept on the job and linked from the key's record, so a
    // request that takes over a dead one's key finds the job it already paid for.
    idempotencyKey: nullableString,
    ...newUserArgs,
  },
  returns: jobRecord.extend(signupGrant),
  handler: async (ctx, { job, maxActive, idempotencyKey, signupCredits, plan }) => {
    requireWhole("cost", job.cost);
    requireWhole("maxActive", maxActive);
    // Creating the user is part of this transaction: a refusal below rolls it back too, so
    // only an accepted job reports a signup grant.
    const { user, signupGrant } = await userOrCreate(ctx, job.userId, signupCredits, plan);
    if (user.credits < job.cost) {
      throw fail(
        "INSUFFICIENT_CREDITS",
        `This job costs ${job.cost} credits; you have ${user.credits}`,
      );
    }
    const active = await countActiveJobs(ctx, job.userId, maxActive);
    if (active >= maxActive) {
      throw fail("TOO_MANY_ACTIVE_JOBS", `You already have ${active} jobs queued or running`);
    }
    if ((await findJobDoc(ctx, job.jobId)) !== null) {
      throw fail("CONFLICT", `Job ${job.jobId} already exists`);
    }
    const now = Date.now();
    const { imageUrl, ...fields } = job;
    const id = await ctx.db.insert("jobs", {
      ...fields,
      ...(imageUrl != null ? { imageUrl } : {}),
      ...(idempotencyKey != null ? { idempotencyKey } : {}),
      status: "submitting",
      createdAt: now,
      updatedAt: now,
      checkedAt: now,
    });
    if (idempotencyKey != null) {
      const claim = await findIdempotencyRecord(ctx, job.userId, idempotencyKey);
      if (claim !== null) {
        await ctx.db.patch("idempotency", claim._id, { jobId: job.jobId });
      }
    }
    await addCredits(ctx, job.userId, -job.cost);
    await writeLedger(ctx, {
      userId: job.userId,
      jobId: job.jobId,
      kind: "charge",
      amount: job.cost,
      reason: "job",
    });
    return { ...toJob((await ctx.db.get("jobs", id))!), signupGrant };
  },
});

export const recordRunpodId = internalMutation({
  args: { jobId: v.string(), runpodId: v.string() },
  returns: jobRecord,
  handler: async (ctx, { jobId, runpodId }) => {
    const job = await jobOrNotFound(ctx, jobId);
    const now = Date.now();
    await ctx.db.patch("jobs", job._id, {
      runpodId: job.runpodId ?? runpodId,
      status: job.status === "submitting" ? "queued" : job.status,
      updatedAt: now,
      checkedAt: now,
    });
    return toJob((await ctx.db.get("jobs", job._id))!);
  },
});

export const applyStatus = internalMutation({
  args: {
    jobId: v.string(),
    status: jobStatus,
    errorCode: nullableString,
    errorDetail: nullableString,
    runpodId: nullableString,
    posterKey: nullableString,
  },
  returns: v.object({ job: jobRecord, changed: v.boolean() }),
  handler: async (ctx, { jobId, status, errorCode, errorDetail, runpodId, posterKey }) => {
    const job = await jobOrNotFound(ctx, jobId);
    if (STATUS_RANK[status] <= STATUS_RANK[job.status]) {
      return { job: toJob(job), changed: false };
    }
    // Like store.py, the update replaces the error fields (clearing them when not given).
    const now = Date.now();
    await ctx.db.patch("jobs", job._id, {
      status,
      errorCode: errorCode ?? undefined,
      errorDetail: errorDetail ?? undefined,
      runpodId: job.runpodId ?? runpodId ?? undefined,
      posterKey: posterKey ?? job.posterKey,
      updatedAt: now,
      checkedAt: now,
    });
    if (REFUNDED_STATUSES.includes(status)) {
      await refund(ctx, job, status);
    }
    return { job: toJob((await ctx.db.get("jobs", job._id))!), changed: true };
  },
});

/** The worker's stages in order (worker/contract.py `PROGRESS_STAGES`): never backwards. */
const PROGRESS_STAGES = ["started", "generating", "uploading"] as const;
const progressStage = v.union(...PROGRESS_STAGES.map((stage) => v.literal(stage)));
/** At most one write per job per second within a stage (models.py `PROGRESS_WRITE_INTERVAL_MS`). */
const PROGRESS_WRITE_INTERVAL_MS = 1000;

/** What to write for a report, or null for nothing: `progress_to_write` in sqlite_store.py. */
function progressToWrite(
  job: Doc<"jobs">,
  report: { progress: number; stage: (typeof PROGRESS_STAGES)[number]; now: number },
): { status: JobStatus; progress: number; stage: string } | null {
  if (isTerminal(job.status)) {
    return null;
  }
  const rank = (stage: string | undefined) =>
    PROGRESS_STAGES.indexOf(stage as (typeof PROGRESS_STAGES)[number]);
  if (rank(report.stage) < rank(job.stage)) {
    return null; // a late report of an earlier stage: the job is past it
  }
  const first = job.progressWrittenAt === undefined;
  const newStage = report.stage !== job.stage;
  if (!first && !newStage) {
    if (report.now - job.progressWrittenAt! < PROGRESS_WRITE_INTERVAL_MS) {
      return null; // the throttle: at most one write a second within a stage
    }
    if (report.progress <= (job.progress ?? 0)) {
      return null; // nothing new to say
    }
  }
  const status = STATUS_RANK[job.status] < STATUS_RANK.running ? "running" : job.status;
  return { status, progress: Math.max(report.progress, job.progress ?? 0), stage: report.stage };
}

/**
 * A worker's progress report. The throttle is decided in this transaction, so it holds across
 * gateway instances: a dropped report costs a read and no write.
 */
export const recordProgress = internalMutation({
  args: { jobId: v.string(), progress: v.number(), stage: progressStage, now: v.number() },
  returns: v.object({ job: jobRecord, written: v.boolean() }),
  handler: async (ctx, { jobId, progress, stage, now }) => {
    if (!(progress >= 0 && progress <= 1)) {
      throw fail("INVALID_REQUEST", "progress must be from 0 to 1");
    }
    const job = await jobOrNotFound(ctx, jobId);
    const write = progressToWrite(job, { progress, stage, now });
    if (write === null) {
      return { job: toJob(job), written: false };
    }
    // `checkedAt` stays: progress is no proof the job will end, and a job the reconciler never
    // picks would never meet its deadline (a leaked token could hold back a refund for ever).
    // `updatedAt` is the deployment's clock, as for every other write, so that the event streams
    // order this write among them; `progressWrittenAt` is the caller's, which the throttle uses.
    await ctx.db.patch("jobs", job._id, {
      ...write,
      progressWrittenAt: now,
      updatedAt: Date.now(),
    });
    return { job: toJob((await ctx.db.get("jobs", job._id))!), written: true };
  },
});

export const cancelJob = internalMutation({
  args: { userId: v.string(), jobId: v.string() },
  returns: jobRecord,
  handler: async (ctx, { userId, jobId }) => {
    const job = await findJobDoc(ctx, jobId);
    if (job === null || job.userId !== userId || job.deletedAt !== undefined) {
      throw fail("NOT_FOUND", "Job not found");
    }
    if (isTerminal(job.status)) {
      throw fail("JOB_NOT_CANCELABLE", `The job is already ${publicStatus(job.status)}`);
    }
    const now = Date.now();
    await ctx.db.patch("jobs", job._id, {
      status: "canceled",
      errorCode: "CANCELED",
      errorDetail: "Canceled by the user",
      updatedAt: now,
      checkedAt: now,
    });
    await refund(ctx, job, "canceled");
    return toJob((await ctx.db.get("jobs", job._id))!);
  },
});

// --- deletion ---------------------------------------------------------------------------------

/**
 * `Store.delete_job`: tombstone a finished job, in one transaction with the status check, so a
 * job still queued or running is refused whatever happens beside it. The row stays (the
 * ledger's rows name it and the audit checks them against its status); the user's content on
 * it goes. A repeat returns the tombstone and writes nothing.
 */
export const deleteJob = internalMutation({
  args: { userId: v.string(), jobId: v.string() },
  returns: jobRecord,
  handler: async (ctx, { userId, jobId }) => {
    const job = await findJobDoc(ctx, jobId);
    if (job === null || job.userId !== userId) {
      throw fail("NOT_FOUND", "Job not found");
    }
    if (job.deletedAt !== undefined) {
      return toJob(job);
    }
    if (!isTerminal(job.status)) {
      throw fail(
        "JOB_NOT_DELETABLE",
        `The job is still ${publicStatus(job.status)}: cancel it first`,
      );
    }
    const now = Date.now();
    // `patch` removes a field set to undefined (convex `src/server/database.ts`, `patch`).
    await ctx.db.patch("jobs", job._id, {
      deletedAt: now,
      updatedAt: now,
      prompt: "",
      imageUrl: undefined,
      errorDetail: undefined,
      downloadUrl: undefined,
      downloadExpiresAt: undefined,
      // The poster's key stays, as the video's does: a retried delete removes both objects.
      posterUrl: undefined,
    });
    return toJob((await ctx.db.get("jobs", job._id))!);
  },
});

export const saveDownloadUrl = internalMutation({
  args: { jobId: v.string(), url: v.string(), expiresAt: v.number(), posterUrl: nullableString },
  returns: v.null(),
  handler: async (ctx, { jobId, url, expiresAt, posterUrl }) => {
    // Like store.py: an unknown job is ignored, and `updatedAt` is about the job, not its URL.
    const job = await findJobDoc(ctx, jobId);
    // Not onto a tombstone: a read that began before a delete must not bring URLs back.
    if (job !== null && job.deletedAt === undefined) {
      await ctx.db.patch("jobs", job._id, {
        downloadUrl: url,
        downloadExpiresAt: expiresAt,
        posterUrl: posterUrl ?? undefined,
      });
    }
    return null;
  },
});

// --- idempotency keys -------------------------------------------------------------------------

const idempotencyClaim = v.object({
  outcome: v.union(v.literal("claimed"), v.literal("replay"), v.literal("in_flight")),
  statusCode: v.union(v.number(), v.null()),
  body: v.union(v.string(), v.null()),
  jobId: v.union(v.string(), v.null()),
});

/**
 * Claim a user's Idempotency-Key for one request, or say what became of the request that holds it.
 *
 * "claimed": go ahead (a `jobId` means a dead request with this key already charged for that job);
 * "replay": send the stored response again; "in_flight": the first request is still running.
 * The same key with a different request is refused with IDEMPOTENCY_KEY_REUSED.
 */
export const claimIdempotencyKey = internalMutation({
  args: {
    userId: v.string(),
    key: v.string(),
    fingerprint: v.string(),
    now: v.number(),
    ttlMs: v.number(),
    staleMs: v.number(),
  },
  returns: idempotencyClaim,
  handler: async (ctx, { userId, key, fingerprint, now, ttlMs, staleMs }) => {
    requireWhole("ttlMs", ttlMs, 1);
    requireWhole("staleMs", staleMs);
    const record = await findIdempotencyRecord(ctx, userId, key);
    if (record === null || record.expiresAt <= now) {
      // An expired record is as good as none: its key starts over, whatever it was used for.
      const fresh = {
        userId,
        key,
        fingerprint,
        state: "in_flight" as const,
        claimedAt: now,
        expiresAt: now + ttlMs,
      };
      if (record === null) {
        await ctx.db.insert("idempotency", fresh);
      } else {
        await ctx.db.replace("idempotency", record._id, fresh);
      }
      return { outcome: "claimed" as const, statusCode: null, body: null, jobId: null };
    }
    if (record.fingerprint !== fingerprint) {
      throw fail(
        "IDEMPOTENCY_KEY_REUSED",
        "This Idempotency-Key was used with a different request",
      );
    }
    const jobId = record.jobId ?? null;
    if (record.state === "done") {
      const statusCode = record.statusCode ?? null;
      return { outcome: "replay" as const, statusCode, body: record.body ?? null, jobId };
    }
    if (now - record.claimedAt < staleMs) {
      return { outcome: "in_flight" as const, statusCode: null, body: null, jobId };
    }
    // The request holding the claim died: this one takes over where it stopped.
    await ctx.db.patch("idempotency", record._id, { claimedAt: now });
    return { outcome: "claimed" as const, statusCode: null, body: null, jobId };
  },
});

/** Store the response to replay for the key. A record that is gone (purged) stays gone. */
export const completeIdempotencyKey = internalMutation({
  args: {
    userId: v.string(),
    key: v.string(),
    statusCode: v.number(),
    body: v.union(v.string(), v.null()),
  },
  returns: v.null(),
  handler: async (ctx, { userId, key, statusCode, body }) => {
    requireWhole("statusCode", statusCode);
    const record = await findIdempotencyRecord(ctx, userId, key);
    if (record !== null) {
      await ctx.db.patch("idempotency", record._id, {
        state: "done",
        statusCode,
        body: body ?? undefined,
      });
    }
    return null;
  },
});

/** Forget an in-flight claim whose request did nothing, so the client may retry with the key. */
export const releaseIdempotencyKey = internalMutation({
  args: { userId: v.string(), key: v.string() },
  returns: v.null(),
  handler: async (ctx, { userId, key }) => {
    const record = await findIdempotencyRecord(ctx, userId, key);
    // A done record is a promise to replay its response: never drop it here.
    if (record !== null && record.state === "in_flight") {
      await ctx.db.delete("idempotency", record._id);
    }
    return null;
  },
});

/** Delete up to `limit` records that expired before `before`; returns how many. */
export const purgeIdempotencyKeys = internalMutation({
  args: { before: v.number(), limit: v.number() },
  returns: v.number(),
  handler: async (ctx, { before, limit }) => {
    requireWhole("limit", limit, 1);
    // Bounded by `take`, however many keys have expired: the next call deletes the rest.
    const expired = await ctx.db
      .query("idempotency")
      .withIndex("by_expires", (q) => q.lt("expiresAt", before))
      .take(Math.min(limit, MAX_BATCH));
    for (const record of expired) {
      await ctx.db.delete("idempotency", record._id);
    }
    return expired.length;
  },
});

// --- the reconciler ---------------------------------------------------------------------------

/**
 * Claim up to `limit` active jobs not checked since `staleBefore`, least recently checked first.
 *
 * The claim is `checkedAt = now`: an instance calling at the same moment sees them as fresh and
 * skips them, so each stale job is checked by one instance at a time.
 */
export const claimStaleJobs = internalMutation({
  args: { staleBefore: v.number(), now: v.number(), limit: v.number() },
  returns: v.array(jobRecord),
  handler: async (ctx, { staleBefore, now, limit }) => {
    requireWhole("limit", limit, 1);
    const claimed = [];
    for (const job of await staleActiveJobs(ctx, staleBefore, Math.min(limit, MAX_BATCH))) {
      claimed.push(await claimCheck(ctx, job, now));
    }
    return claimed;
  },
});

/** Claim one job like `claimStaleJobs`; null if it is unknown, finished, or checked recently. */
export const claimJobCheck = internalMutation({
  args: { jobId: v.string(), staleBefore: v.number(), now: v.number() },
  returns: v.union(jobRecord, v.null()),
  handler: async (ctx, { jobId, staleBefore, now }) => {
    const job = await findJobDoc(ctx, jobId);
    if (job === null || !ACTIVE_STATUSES.includes(job.status) || job.checkedAt >= staleBefore) {
      return null;
    }
    return await claimCheck(ctx, job, now);
  },
});

// --- reads ------------------------------------------------------------------------------------

export const getJob = internalQuery({
  args: { userId: v.string(), jobId: v.string() },
  returns: jobRecord,
  handler: async (ctx, { userId, jobId }) => {
    const job = await findJobDoc(ctx, jobId);
    // Another user's job is "not found" too: never reveal that a job id exists. So is a
    // deleted one: gone for its owner.
    if (job === null || job.userId !== userId || job.deletedAt !== undefined) {
      throw fail("NOT_FOUND", "Job not found");
    }
    return toJob(job);
  },
});

export const findJob = internalQuery({
  args: { jobId: v.string() },
  returns: v.union(jobRecord, v.null()),
  handler: async (ctx, { jobId }) => {
    const job = await findJobDoc(ctx, jobId);
    return job === null ? null : toJob(job);
  },
});

export const findJobByRunpodId = internalQuery({
  args: { runpodId: v.string() },
  returns: v.union(jobRecord, v.null()),
  handler: async (ctx, { runpodId }) => {
    const job = await ctx.db
      .query("jobs")
      .withIndex("by_runpodId", (q) => q.eq("runpodId", runpodId))
      .first();
    return job === null ? null : toJob(job);
  },
});

export const listJobs = internalQuery({
  args: { userId: v.string(), limit: v.number(), cursor: v.union(v.string(), v.null()) },
  returns: v.object({ jobs: v.array(jobRecord), nextCursor: v.union(v.string(), v.null()) }),
  handler: async (ctx, { userId, limit, cursor }) => {
    requireWhole("limit", limit, 1);
    let result;
    try {
      result = await ctx.db
        .query("jobs")
        .withIndex("by_user_live_created", (q) => q.eq("userId", userId).eq("deletedAt", undefined))
        .order("desc")
        .paginate({ numItems: clampPageSize(limit), cursor });
    } catch (error) {
      // Only a refused cursor is the caller's fault; a read limit or a bug stays what it is.
      if (isInvalidCursor(error)) {
        throw fail("INVALID_CURSOR", "The cursor is malformed");
      }
      throw error;
    }
    const last = result.page.at(-1);
    // A full last page may still say "not done": like store.py, hand out a cursor only when
    // another job really follows.
    const more = !result.isDone && last !== undefined && (await hasOlderJob(ctx, last));
    return { jobs: result.page.map(toJob), nextCursor: more ? result.continueCursor : null };
  },
});

/**
 * `Store.jobs_updated_since`: jobs whose (updatedAt, jobId) comes after (since, afterJobId),
 * oldest change first. Two index ranges on `by_updated` (the jobs updated at `since` itself,
 * after `afterJobId`; then the later ones) of the 4,096 one function may read.
 */
export const jobsUpdatedSince = internalQuery({
  args: { since: v.number(), afterJobId: v.string(), limit: v.number() },
  returns: v.array(jobRecord),
  handler: async (ctx, { since, afterJobId, limit }) => {
    requireWhole("limit", limit, 1);
    const wanted = Math.min(limit, MAX_UPDATED_JOBS);
    const ties = await ctx.db
      .query("jobs")
      .withIndex("by_updated", (q) => q.eq("updatedAt", since).gt("jobId", afterJobId))
      .take(wanted);
    const later =
      ties.length < wanted
        ? await ctx.db
            .query("jobs")
            .withIndex("by_updated", (q) => q.gt("updatedAt", since))
            .take(wanted - ties.length)
        : [];
    return [...ties, ...later].map(toJob);
  },
});

/** `Store.ping`: proves the deployment answers and the key works, reading nothing. */
export const ping = internalQuery({
  args: {},
  returns: v.null(),
  handler: async () => null,
});

// --- operator views, walked across calls ------------------------------------------------------
//
// `manage.py audit` must work on any deployment, but one function may read at most 32,000
// documents, 16 MiB and 4,096 index ranges (convex-backend `npm-packages/docs/docs/production/
// state/limits.mdx`). So the audit and the totals are walks: each call reads within a budget of
// documents and bytes, through at most four index ranges, and hands back a cursor. Each
// walk is a merge of two streams in the same key order: users with their ledger rows by user,
// jobs with their ledger rows by job. One call is one snapshot: a user whose balance and ledger
// rows are read in one call (every user with fewer rows than a call's budget) and every job with
// its rows are checked consistently, whatever runs meanwhile.

/**
 * What one call reads at most: half of each limit (32,000 documents, 16 MiB). The budget is
 * checked after a read, a document may be 1 MiB (limits.mdx), and the merge reads one ledger
 * row ahead. The backend counts a document when the function receives it, not when it
 * prefetches it (convex-backend `crates/database/src/query/index_range.rs`,
 * `record_read_document`); sizes are `getDocumentSize`'s, convex/values' copy of its accounting.
 */
const WALK_MAX_READS = 16_000;
const WALK_MAX_BYTES = 8 * 1024 * 1024;

/** Where a walk stopped: after a key, or inside one user's ledger rows (their sums so far). */
type WalkCursor = {
  phase: "users" | "jobs";
  after: string | null;
  inside: { userId: string; lastRow: number; sums: LedgerSums } | null;
};

type UserTotal = {
  userId: string;
  credits: number;
  grants: number;
  charges: number;
  refunds: number;
};

const START: WalkCursor = { phase: "users", after: null, inside: null };

function encodeCursor(cursor: WalkCursor | null): string | null {
  return cursor === null ? null : JSON.stringify(cursor);
}

function decodeCursor(text: string | null): WalkCursor {
  if (text === null) {
    return START;
  }
  try {
    const cursor = JSON.parse(text) as WalkCursor;
    if (["users", "jobs"].includes(cursor.phase) && "after" in cursor && "inside" in cursor) {
      return cursor;
    }
  } catch {
    // not JSON: the same answer as a wrong shape, below
  }
  throw fail("INVALID_CURSOR", "The cursor is malformed");
}

/** Counts what a call has read, against its budget of documents and bytes. */
class Reader {
  private reads = 0;
  private bytes = 0;
  private readonly budget: number;

  constructor(maxReads: number | undefined) {
    // Two reads at least, so every call gets past one user or one ledger row.
    const asked = Math.floor(maxReads ?? WALK_MAX_READS) || 2;
    this.budget = Math.min(Math.max(asked, 2), WALK_MAX_READS);
  }

  count<T extends Record<string, Value>>(doc: T): T {
    this.reads += 1;
    this.bytes += getDocumentSize(doc);
    return doc;
  }

  /** The next value of a stream, counted. */
  async next<T extends Record<string, Value>>(stream: AsyncIterator<T>): Promise<T | undefined> {
    const { value, done } = await stream.next();
    return done ? undefined : this.count(value);
  }

  get spent(): boolean {
    return this.reads >= this.budget || this.bytes >= WALK_MAX_BYTES;
  }
}

/**
 * Ledger rows in `by_user` order from where the cursor stopped (one or two index ranges).
 *
 * Resuming after `lastRow` skips nothing: one user's rows never share a `_creationTime`, since
 * each is written with a change to that user's document, so their transactions serialize, and
 * one transaction's creation times increase (convex-backend `crates/database/src/transaction.rs`,
 * `next_creation_time`).
 */
async function* ledgerByUser(ctx: QueryCtx, cursor: WalkCursor): AsyncGenerator<Doc<"ledger">> {
  const rows = () => ctx.db.query("ledger");
  if (cursor.inside !== null) {
    const { userId, lastRow } = cursor.inside;
    yield* rows().withIndex("by_user", (q) => q.eq("userId", userId).gt("_creationTime", lastRow));
    yield* rows().withIndex("by_user", (q) => q.gt("userId", userId));
  } else if (cursor.after !== null) {
    const after = cursor.after;
    yield* rows().withIndex("by_user", (q) => q.gt("userId", after));
  } else {
    yield* rows().withIndex("by_user");
  }
}

function usersFrom(ctx: QueryCtx, cursor: WalkCursor) {
  const users = ctx.db.query("users");
  if (cursor.inside !== null) {
    const userId = cursor.inside.userId;
    return users.withIndex("by_userId", (q) => q.gte("userId", userId));
  }
  const after = cursor.after;
  return after === null
    ? users.withIndex("by_userId")
    : users.withIndex("by_userId", (q) => q.gt("userId", after));
}

function userTotal(user: Doc<"users">, sums: LedgerSums): UserTotal {
  const { userId, credits } = user;
  return { userId, credits, grants: sums.grant, charges: sums.charge, refunds: sums.refund };
}

/**
 * Per user, in `userId` order from the cursor: the balance and the sums of the ledger.
 *
 * Keys are Clerk ids, plain ASCII, so JavaScript's string order is the index's byte order.
 */
async function walkBalances(
  ctx: QueryCtx,
  cursor: WalkCursor,
  maxReads: number | undefined,
): Promise<{ totals: UserTotal[]; next: WalkCursor | null }> {
  const reader = new Reader(maxReads);
  const rows = ledgerByUser(ctx, cursor);
  let row = await reader.next(rows);
  let carried = cursor.inside;
  const totals: UserTotal[] = [];
  for await (const user of usersFrom(ctx, cursor)) {
    reader.count(user);
    const sums =
      carried?.userId === user.userId ? carried.sums : { grant: 0, charge: 0, refund: 0 };
    carried = null;
    // A row of no user has no balance to check against (none exist: every row is written for
    // a user the same mutation found or created).
    while (row !== undefined && row.userId < user.userId) {
      row = await reader.next(rows);
    }
    while (row !== undefined && row.userId === user.userId) {
      sums[row.kind] += row.amount;
      if (reader.spent) {
        const inside = { userId: user.userId, lastRow: row._creationTime, sums };
        return { totals, next: { phase: "users", after: null, inside } };
      }
      row = await reader.next(rows);
    }
    totals.push(userTotal(user, sums));
    if (reader.spent) {
      return { totals, next: { phase: "users", after: user.userId, inside: null } };
    }
  }
  return { totals, next: null };
}

/**
 * Per job, in `jobId` order after `after`: the problems with its charge and refund rows.
 *
 * The budget is checked between jobs only: a job has at most one charge (written with it) and
 * one refund (`refund` checks for an earlier one), so its rows are a handful at most.
 */
async function walkJobs(
  ctx: QueryCtx,
  after: string | null,
  maxReads: number | undefined,
): Promise<{ problems: string[]; next: WalkCursor | null }> {
  const reader = new Reader(maxReads);
  // Rows without a job (grants) sort first in the index, before every string: skip them.
  const rows = ctx.db
    .query("ledger")
    .withIndex("by_job_kind", (q) => (after === null ? q.gte("jobId", "") : q.gt("jobId", after)))
    [Symbol.asyncIterator]();
  const jobs = ctx.db
    .query("jobs")
    .withIndex("by_jobId", (q) => (after === null ? q : q.gt("jobId", after)));
  let row = await reader.next(rows);
  const problems: string[] = [];
  for await (const job of jobs) {
    reader.count(job);
    const counts = { grant: 0, charge: 0, refund: 0 };
    while (row !== undefined && row.jobId! < job.jobId) {
      row = await reader.next(rows);
    }
    while (row !== undefined && row.jobId === job.jobId) {
      counts[row.kind] += 1;
      row = await reader.next(rows);
    }
    problems.push(...jobProblems(job, counts));
    if (reader.spent) {
      return { problems, next: { phase: "jobs", after: job.jobId, inside: null } };
    }
  }
  return { problems, next: null };
}

/** Every job has exactly one charge; a failed or canceled one exactly one refund, others none. */
function jobProblems(job: Doc<"jobs">, counts: LedgerSums): string[] {
  const problems = [];
  if (counts.charge !== 1) {
    problems.push(`${job.jobId}: ${counts.charge} charges`);
  }
  const expected = REFUNDED_STATUSES.includes(job.status) ? 1 : 0;
  if (counts.refund !== expected) {
    problems.push(`${job.jobId} (${job.status}): ${counts.refund} refunds`);
  }
  return problems;
}

function balanceProblem({ userId, credits, grants, charges, refunds }: UserTotal): string[] {
  if (credits === grants - charges + refunds) {
    return [];
  }
  return [
    `${userId}: balance ${credits} != grants ${grants} - charges ${charges} + refunds ${refunds}`,
  ];
}

const walkArgs = {
  cursor: v.union(v.string(), v.null()),
  // Tests make it small to cross call boundaries; callers leave it out.
  maxReads: v.optional(v.number()),
};

const ledgerTotal = v.object({
  userId: v.string(),
  credits: v.number(),
  grants: v.number(),
  charges: v.number(),
  refunds: v.number(),
});

/**
 * Per user, in `userId` order: the balance and the sums of grants, charges and refunds
 * (`manage.py audit`). One page per call; pass `cursor` back until it is null.
 */
export const ledgerTotals = internalQuery({
  args: walkArgs,
  returns: v.object({ totals: v.array(ledgerTotal), cursor: v.union(v.string(), v.null()) }),
  handler: async (ctx, { cursor, maxReads }) => {
    const from = decodeCursor(cursor);
    if (from.phase !== "users") {
      throw fail("INVALID_CURSOR", "The cursor is not a totals cursor");
    }
    const { totals, next } = await walkBalances(ctx, from, maxReads);
    return { totals, cursor: encodeCursor(next) };
  },
});

/**
 * What is wrong with the books, one line per problem (`manage.py audit`): users in `userId`
 * order, then jobs in `jobId` order. One page per call; pass `cursor` back until it is null.
 *
 * Every balance must equal grants - charges + refunds, every job must have exactly one charge,
 * every failed or canceled job exactly one refund, and every other job none.
 */
export const audit = internalQuery({
  args: walkArgs,
  returns: v.object({ problems: v.array(v.string()), cursor: v.union(v.string(), v.null()) }),
  handler: async (ctx, { cursor, maxReads }) => {
    const from = decodeCursor(cursor);
    if (from.phase === "jobs") {
      const { problems, next } = await walkJobs(ctx, from.after, maxReads);
      return { problems, cursor: encodeCursor(next) };
    }
    const { totals, next } = await walkBalances(ctx, from, maxReads);
    const jobsNext: WalkCursor = { phase: "jobs", after: null, inside: null };
    return { problems: totals.flatMap(balanceProblem), cursor: encodeCursor(next ?? jobsNext) };
  },
});

// --- uploads (`uploads.py`) ---------------------------------------------------------------------

const uploadRecord = v.object({
  uploadId: v.string(),
  userId: v.string(),
  contentType: v.string(),
  sizeBytes: v.number(),
  objectKey: v.string(),
  createdAt: v.number(),
  expiresAt: v.number(),
  usableUntil: v.number(),
});

function toUpload(doc: Doc<"uploads">) {
  const { _id, _creationTime, ...fields } = doc;
  return fields;
}

/**
 * Record an upload, unless the user already has `maxPending` whose URL is still live at its
 * `createdAt` (the gateway's clock). One transaction, so two instances cannot both take the last
 * place; the count reads one bounded index range (`take(maxPending)`), whatever the history.
 */
export const createUpload = internalMutation({
  args: { upload: uploadRecord, maxPending: v.number() },
  returns: uploadRecord,
  handler: async (ctx, { upload, maxPending }) => {
    requireWhole("maxPending", maxPending, 1);
    requireWhole("sizeBytes", upload.sizeBytes, 1);
    const pending = await ctx.db
      .query("uploads")
      .withIndex("by_user_expires", (q) =>
        q.eq("userId", upload.userId).gt("expiresAt", upload.createdAt),
      )
      .take(maxPending);
    if (pending.length >= maxPending) {
      // Ascending `expiresAt`: the first frees the first place. Rounded up, at least 1 s.
      const wait = Math.max(1, Math.ceil((pending[0].expiresAt - upload.createdAt) / 1000));
      throw fail(
        "TOO_MANY_PENDING_UPLOADS",
        `You have ${pending.length} uploads pending; the limit is ${maxPending}`,
        wait,
      );
    }
    const existing = await ctx.db
      .query("uploads")
      .withIndex("by_uploadId", (q) => q.eq("uploadId", upload.uploadId))
      .unique();
    if (existing !== null) {
      throw fail("CONFLICT", `Upload ${upload.uploadId} already exists`);
    }
    const id = await ctx.db.insert("uploads", upload);
    return toUpload((await ctx.db.get("uploads", id))!);
  },
});

/** The user's upload; another user's is the same `UPLOAD_NOT_FOUND` as an unknown id. */
export const getUpload = internalQuery({
  args: { userId: v.string(), uploadId: v.string() },
  returns: uploadRecord,
  handler: async (ctx, { userId, uploadId }) => {
    const upload = await ctx.db
      .query("uploads")
      .withIndex("by_uploadId", (q) => q.eq("uploadId", uploadId))
      .unique();
    if (upload === null || upload.userId !== userId) {
      throw fail("UPLOAD_NOT_FOUND", "Upload not found");
    }
    return toUpload(upload);
  },
});

/** Forget up to `limit` uploads no job may use any more; bounded like `purgeIdempotencyKeys`. */
export const purgeExpiredUploads = internalMutation({
  args: { before: v.number(), limit: v.number() },
  returns: v.number(),
  handler: async (ctx, { before, limit }) => {
    requireWhole("limit", limit, 1);
    const expired = await ctx.db
      .query("uploads")
      .withIndex("by_usableUntil", (q) => q.lte("usableUntil", before))
      .take(Math.min(limit, MAX_BATCH));
    for (const upload of expired) {
      await ctx.db.delete("uploads", upload._id);
    }
    return expired.length;
  },
});
