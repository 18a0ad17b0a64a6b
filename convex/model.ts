/**
 * What `gateway.ts` and `webapp.ts` share: the lifecycle rules, the error shape, and the plain
 * records handed back to callers (the same shapes as `models.py`'s `User` and `Job`).
 *
 * This module exports no Convex functions.
 */
import { ConvexError, v, type Infer } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { jobStatus } from "./schema";

export type JobStatus = Infer<typeof jobStatus>;

/** The order of the lifecycle: a job may only move to a higher rank (`models.py` `_RANK`). */
export const STATUS_RANK: Record<JobStatus, number> = {
  submitting: 0,
  queued: 1,
  running: 2,
  done: 3,
  failed: 3,
  canceled: 3,
};
export const ACTIVE_STATUSES: JobStatus[] = ["submitting", "queued", "running"];
export const REFUNDED_STATUSES: JobStatus[] = ["failed", "canceled"];

export function isTerminal(status: JobStatus): boolean {
  return STATUS_RANK[status] === 3;
}

/** `submitting` is internal: the public API shows it as `queued`. */
export function publicStatus(status: JobStatus): Exclude<JobStatus, "submitting"> {
  return status === "submitting" ? "queued" : status;
}

/**
 * The codes the gateway maps to HTTP statuses (`errors.py`). Thrown as `ConvexError`, so the data
 * reaches the caller as `errorData` and the mutation commits nothing.
 */
export type ErrorCode =
  | "INSUFFICIENT_CREDITS"
  | "TOO_MANY_ACTIVE_JOBS"
  | "NOT_FOUND"
  | "JOB_NOT_CANCELABLE"
  | "JOB_NOT_DELETABLE"
  | "CONFLICT"
  | "INVALID_CURSOR"
  | "INVALID_REQUEST"
  | "IDEMPOTENCY_KEY_REUSED"
  | "TOO_MANY_PENDING_UPLOADS"
  | "UPLOAD_NOT_FOUND";

// `retryAfter` (seconds) becomes the answer's Retry-After header when the gateway knows when
// a retry can succeed (`convex_client.py` `_convex_error`).
export type ErrorData = { code: ErrorCode; message: string; retryAfter?: number };

export function fail(
  code: ErrorCode,
  message: string,
  retryAfter?: number,
): ConvexError<ErrorData> {
  return new ConvexError(
    retryAfter === undefined ? { code, message } : { code, message, retryAfter },
  );
}

/** Money and limits are whole numbers; `v.number()` alone would accept 1.5 or -3. */
export function requireWhole(name: string, value: number, min = 0): void {
  if (!Number.isSafeInteger(value) || value < min) {
    throw fail("INVALID_REQUEST", `${name} must be an integer >= ${min}`);
  }
}

/** A string or null; also accepts the field being left out. */
export const nullableString = v.optional(v.union(v.string(), v.null()));

export const userRecord = v.object({
  userId: v.string(),
  credits: v.number(),
  plan: v.string(),
  createdAt: v.number(),
  updatedAt: v.number(),
});

export const jobRecord = v.object({
  jobId: v.string(),
  userId: v.string(),
  status: jobStatus,
  prompt: v.string(),
  imageUrl: v.union(v.string(), v.null()),
  durationSec: v.number(),
  seed: v.number(),
  cost: v.number(),
  objectKey: v.string(),
  runpodId: v.union(v.string(), v.null()),
  errorCode: v.union(v.string(), v.null()),
  errorDetail: v.union(v.string(), v.null()),
  downloadUrl: v.union(v.string(), v.null()),
  downloadExpiresAt: v.union(v.number(), v.null()),
  idempotencyKey: v.union(v.string(), v.null()),
  createdAt: v.number(),
  updatedAt: v.number(),
  checkedAt: v.number(),
  progress: v.union(v.number(), v.null()),
  stage: v.union(v.string(), v.null()),
  progressWrittenAt: v.union(v.number(), v.null()),
  posterKey: v.union(v.string(), v.null()),
  posterUrl: v.union(v.string(), v.null()),
  // Set on a deleted job's tombstone: only `jobsUpdatedSince` returns one, so that the event
  // streams can say the job is gone.
  deletedAt: v.union(v.number(), v.null()),
});

export type UserRecord = Infer<typeof userRecord>;
export type JobRecord = Infer<typeof jobRecord>;

export function toUser(doc: Doc<"users">): UserRecord {
  return {
    userId: doc.userId,
    credits: doc.credits,
    plan: doc.plan,
    createdAt: doc.createdAt,
    updatedAt: doc.updatedAt,
  };
}

/** Every optional field is present, as null when unset, so callers get one stable shape. */
export function toJob(doc: Doc<"jobs">): JobRecord {
  return {
    jobId: doc.jobId,
    userId: doc.userId,
    status: doc.status,
    prompt: doc.prompt,
    imageUrl: doc.imageUrl ?? null,
    durationSec: doc.durationSec,
    seed: doc.seed,
    cost: doc.cost,
    objectKey: doc.objectKey,
    runpodId: doc.runpodId ?? null,
    errorCode: doc.errorCode ?? null,
    errorDetail: doc.errorDetail ?? null,
    downloadUrl: doc.downloadUrl ?? null,
    downloadExpiresAt: doc.downloadExpiresAt ?? null,
    idempotencyKey: doc.idempotencyKey ?? null,
    createdAt: doc.createdAt,
    updatedAt: doc.updatedAt,
    checkedAt: doc.checkedAt,
    progress: doc.progress ?? null,
    stage: doc.stage ?? null,
    progressWrittenAt: doc.progressWrittenAt ?? null,
    posterKey: doc.posterKey ?? null,
    posterUrl: doc.posterUrl ?? null,
    deletedAt: doc.deletedAt ?? null,
  };
}

/** The most jobs one page may hold: the gateway's `GET /jobs` allows 100 (`models.py`). */
export const MAX_PAGE_ITEMS = 100;

// One poll of `jobsUpdatedSince` reads at most this many jobs: a job document is a few KiB
// (prompt, URLs), so a page stays far below the 16 MiB and 32,000 documents one function may read.
export const MAX_UPDATED_JOBS = 500;

/**
 * A page size the backend accepts and that keeps one page's reads small, whatever was asked.
 *
 * The backend refuses 0 ("NoDocumentsForPagination") and more than its row limit
 * ("PageSizeTooLarge"): convex-backend `crates/isolate/src/environment/udf/async_syscall.rs`.
 */
export function clampPageSize(numItems: number): number {
  return Math.min(Math.max(Math.floor(numItems) || 1, 1), MAX_PAGE_ITEMS);
}

// How an invalid cursor reaches a function's `paginate()`, and nothing else does:
// - a cursor of another query: a ConvexError-like Error whose message starts "InvalidCursor:" and
//   whose data is {isConvexSystemError: true, paginationError: "InvalidCursor"} (convex-backend
//   `crates/database/src/query/mod.rs` `invalid_cursor`; `usePaginatedQuery` tests the same two
//   things, `npm-packages/convex/src/react/use_paginated_query.ts`);
// - a string that does not decrypt, or is for another deployment: an Error whose message is
//   "Failed to parse cursor", "Key is invalid for instance ..." or "Missing position field"
//   (`crates/keybroker/src/broker.rs` `cursor_parse_error`, `proto_to_cursor`);
// - convex-test (0.0.60 `dist/index.js` `DatabaseFake.paginate`): its cursors are JSON, and one
//   it did not issue fails in `JSON.parse` (a SyntaxError naming JSON) or in the `.map` over the
//   parsed keys; `performAsyncSyscall` re-throws the message as a plain Error
//   (`convex/src/server/impl/syscall.ts`).
// A read-limit error ("Too many documents read ...", "Too many reads ...") matches none of these.
const CURSOR_ERROR_MESSAGES = [
  /^InvalidCursor\b/,
  /^Failed to parse cursor\b/,
  /^Key is invalid for instance\b/,
  /^Missing position field\b/,
  /\bJSON\b/,
  /\bmap is not a function\b|\(reading 'map'\)/,
];

/** True when `paginate()` refused the cursor it was given, and only then. */
export function isInvalidCursor(error: unknown): boolean {
  if (!(error instanceof Error)) {
    return false;
  }
  const data = (error as { data?: { paginationError?: unknown } }).data;
  if (typeof data === "object" && data?.paginationError === "InvalidCursor") {
    return true;
  }
  return CURSOR_ERROR_MESSAGES.some((pattern) => pattern.test(error.message));
}
