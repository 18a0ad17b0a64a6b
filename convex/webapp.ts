/**
 * Public queries for the web app, signed in with Clerk (see `auth.config.ts`).
 *
 * Every query is scoped to the caller's own Clerk user id (the token's `subject`) and takes no
 * user id argument, so no argument can reach another user's data. Signed out: null or an empty
 * page. Jobs are shown as the gateway's HTTP API shows them (`JobResponse` in `models.py`),
 * field for field: `submitting` reads as `queued`, the download URL appears only once the job is
 * done, and the storage key, RunPod id and owner stay inside.
 */
import { paginationOptsValidator } from "convex/server";
import { v, type Infer } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { query, type QueryCtx } from "./_generated/server";
import { clampPageSize, fail, isInvalidCursor, isTerminal, publicStatus } from "./model";

async function callerId(ctx: QueryCtx): Promise<string | null> {
  const identity = await ctx.auth.getUserIdentity();
  return identity?.subject ?? null;
}

/** The statuses the public API shows: `submitting` is internal and reads as `queued`. */
const publicStatusValidator = v.union(
  v.literal("queued"),
  v.literal("running"),
  v.literal("done"),
  v.literal("failed"),
  v.literal("canceled"),
);

/**
 * A job exactly as the gateway's `GET /jobs/{id}` shows it (`JobResponse` in `models.py`): the
 * same fields in the same order, times as ISO 8601 UTC with milliseconds. Both are checked
 * against `tests/fixtures/public_jobs.json`.
 *
 * One difference cannot be avoided: `r2Url` here is the URL the gateway presigned last. Convex
 * holds no R2 credentials and a query cannot write, so it cannot presign one. It is null until
 * the gateway has served the done job once, and it goes stale at `expiresAt`, while the gateway
 * hands out a fresh one whenever less than an hour is left. When `r2Url` is null or `expiresAt`
 * is near, ask `GET /jobs/{id}`: it saves the fresh URL, and this query then shows it.
 */
const publicJob = v.object({
  jobId: v.string(),
  status: publicStatusValidator,
  progress: v.union(v.number(), v.null()),
  stage: v.union(v.string(), v.null()),
  // The owner's own bearer link to their video: fine to show them, and only them.
  r2Url: v.union(v.string(), v.null()),
  expiresAt: v.union(v.string(), v.null()),
  // Its poster, presigned with the video by the gateway: the same caveat as `r2Url` applies.
  posterUrl: v.union(v.string(), v.null()),
  posterExpiresAt: v.union(v.string(), v.null()),
  durationSec: v.number(),
  prompt: v.string(),
  imageUrl: v.union(v.string(), v.null()),
  seed: v.number(),
  cost: v.number(),
  createdAt: v.string(),
  updatedAt: v.string(),
  error: v.union(v.object({ code: v.string(), detail: v.string() }), v.null()),
});

type PublicJob = Infer<typeof publicJob>;

/** `models.py` `iso_from_ms`: "2026-11-25T12:29:50.120Z". */
function isoFromMs(ms: number): string {
  return new Date(ms).toISOString();
}

/** `models.py` `job_progress`: the latest report while active, 1 once done, else null. */
function progressOf(doc: Doc<"jobs">): { progress: number | null; stage: string | null } {
  if (doc.status === "done") {
    return { progress: 1, stage: null };
  }
  if (isTerminal(doc.status)) {
    return { progress: null, stage: null };
  }
  return { progress: doc.progress ?? null, stage: doc.stage ?? null };
}

function toPublicJob(doc: Doc<"jobs">): PublicJob {
  const done = doc.status === "done";
  const expiresAt = done ? (doc.downloadExpiresAt ?? null) : null;
  const expiresIso = expiresAt === null ? null : isoFromMs(expiresAt);
  const posterUrl = done && doc.posterKey ? (doc.posterUrl ?? null) : null;
  const { progress, stage } = progressOf(doc);
  return {
    jobId: doc.jobId,
    status: publicStatus(doc.status),
    progress,
    stage,
    r2Url: done ? (doc.downloadUrl ?? null) : null,
    expiresAt: expiresIso,
    posterUrl,
    posterExpiresAt: posterUrl === null ? null : expiresIso,
    durationSec: doc.durationSec,
    prompt: doc.prompt,
    imageUrl: doc.imageUrl ?? null,
    seed: doc.seed,
    cost: doc.cost,
    createdAt: isoFromMs(doc.createdAt),
    updatedAt: isoFromMs(doc.updatedAt),
    error: doc.errorCode ? { code: doc.errorCode, detail: doc.errorDetail ?? "" } : null,
  };
}

export const myCredits = query({
  args: {},
  returns: v.union(v.object({ credits: v.number(), plan: v.string() }), v.null()),
  handler: async (ctx) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return null;
    }
    const user = await ctx.db
      .query("users")
      .withIndex("by_userId", (q) => q.eq("userId", userId))
      .unique();
    return user === null ? null : { credits: user.credits, plan: user.plan };
  },
});

/** The caller's jobs, newest first, for `usePaginatedQuery`. */
export const myJobs = query({
  args: { paginationOpts: paginationOptsValidator },
  handler: async (ctx, { paginationOpts }) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return { page: [], isDone: true, continueCursor: "" };
    }
    let result;
    try {
      result = await ctx.db
        .query("jobs")
        // Live jobs only: a deleted job is gone for its owner (`gateway.ts` `deleteJob`).
        .withIndex("by_user_live_created", (q) => q.eq("userId", userId).eq("deletedAt", undefined))
        .order("desc")
        .paginate({ ...paginationOpts, numItems: clampPageSize(paginationOpts.numItems) });
    } catch (error) {
      if (!isInvalidCursor(error)) {
        throw error; // a read limit or a bug must not pass for a bad cursor
      }
      // "InvalidCursor" in the message makes `usePaginatedQuery` start over from the first page.
      throw fail("INVALID_CURSOR", "InvalidCursor: the cursor is malformed");
    }
    return { ...result, page: result.page.map(toPublicJob) };
  },
});

/** One of the caller's jobs, or null (also for another user's job). */
export const myJob = query({
  args: { jobId: v.string() },
  returns: v.union(publicJob, v.null()),
  handler: async (ctx, { jobId }) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return null;
    }
    const job = await ctx.db
      .query("jobs")
      .withIndex("by_jobId", (q) => q.eq("jobId", jobId))
      .unique();
    const visible = job !== null && job.userId === userId && job.deletedAt === undefined;
    return visible ? toPublicJob(job) : null;
  },
});
