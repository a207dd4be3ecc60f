/* consumer.h - the consumer worker: reads the events topic as a member of a consumer group and
 *              applies it to PostgreSQL in batches, exactly once (order_store.h), or replays the
 *              whole log into a database (docs/consumer.md).
 *
 * Live: any number of consumers share the topic's partitions. On every assignment a consumer
 * starts each partition at the offset stored in PostgreSQL (not the one committed to Kafka, which
 * is only informative); on a revocation it first commits the batch in hand. Events that cannot be
 * applied go to the dead-letter topic, flushed before the transaction that moves past them
 * commits. After each commit it corrects Redis downwards for SKUs where PostgreSQL refused orders
 * (cap.lua), drops the stored orders' entries from Redis's `resv` hash and commits the offsets to
 * Kafka; failures there are logged and counted, never fatal. SIGTERM: finish the batch, commit,
 * leave the group, exit 0.
 *
 * Replay: every partition from the beginning (or from a time) up to the end offsets taken at
 * start, with the same batches and the same rules, storing offsets as it goes; no Redis, no Kafka
 * commits, no dead letters (they went out on the live run). Exits when done.
 */
#ifndef SP_CONSUMER_H
#define SP_CONSUMER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

/* What `consumer` was asked to do, from its positional arguments. */
typedef struct sp_consumer_opts {
    int replay;             /* --replay or --replay-from: apply the log to its end, then exit */
    int64_t replay_from_ms; /* --replay-from: start at the first event at or after this time; -1 */
    int replay_force;       /* --replay-force: replay into a database that already holds rows */
} sp_consumer_opts;

/* The arguments as --help shows them, under the usage line. */
#define SP_CONSUMER_SYNOPSIS                                                                       \
    "[--replay [--replay-force] | --replay-from=TIME]\n\n"                                         \
    "Without arguments: consume the events topic as a member of KAFKA_GROUP until SIGTERM.\n"      \
    "  --replay            apply the whole log to PG_DSN (an empty database), up to the end\n"     \
    "                      offsets taken at start, then exit; see docs/consumer.md\n"              \
    "  --replay-force      with --replay: also into a database that holds rows (events below\n"    \
    "                      its stored offsets are skipped)\n"                                      \
    "  --replay-from=TIME  replay from the first event at or after TIME: ms since the epoch or\n"  \
    "                      an ISO 8601 UTC time such as 2026-11-22T10:00:00Z"

/* Reads the positional arguments (`consumer --replay` etc.): TIME is milliseconds since the epoch
 * or an ISO 8601 UTC time such as 2026-11-22T10:00:00Z. 0, or -1 with the reason in errbuf. */
int sp_consumer_parse_args(int nargs, char *const *args, sp_consumer_opts *opts, char *errbuf,
                           size_t errlen) __attribute__((warn_unused_result));

/* Runs the consumer until SIGTERM/SIGINT (live) or the end of the log (replay), on the calling
 * thread, with the health server on a thread of its own (live only). Returns the exit status: 0
 * after a clean stop or a complete replay, 1 when the last batch could not be committed or a
 * replay failed, 2 for a startup error (logged as one sentence). */
int sp_consumer_run(const sp_config *cfg, const sp_consumer_opts *opts);

#endif
