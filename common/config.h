/* config.h - every setting of every worker, loaded from the environment and --flags. */
#ifndef SP_CONFIG_H
#define SP_CONFIG_H

#include <stdio.h>

/* Which workers a setting applies to (a bit mask). */
#define SP_WORKER_PRODUCER 1u
#define SP_WORKER_CONSUMER 2u
#define SP_WORKER_REAPER   4u
#define SP_WORKER_TOOL     8u /* tests and benchmarks that read the stack's settings */
#define SP_WORKER_ALL      15u

#define SP_CONFIG_ARGS_MAX 8

/* The loaded settings. Strings live in fixed buffers: loading never allocates, and a value that
 * does not fit is a startup error, not a silent truncation. */
typedef struct sp_config {
    char redis_url[512];
    char kafka_brokers[512];
    char kafka_topic[250];
    char kafka_dlq_topic[250];
    char kafka_group[250];
    /* Kafka's security (managed clusters): applied to every client by sp_kafka_conf_new. The
     * protocol and mechanism are stored normalized (lower-case, upper-case). */
    char kafka_security_protocol[32]; /* plaintext, ssl, sasl_plaintext, sasl_ssl */
    char kafka_sasl_mechanism[32];    /* SCRAM-SHA-512, SCRAM-SHA-256, PLAIN */
    char kafka_sasl_username[256];
    char kafka_sasl_password[256];            /* secret: never logged */
    char kafka_ssl_ca_location[512];          /* CA the brokers' certificates are checked with */
    char kafka_ssl_certificate_location[512]; /* mutual TLS: the client's certificate */
    char kafka_ssl_key_location[512];         /* mutual TLS: its private key */
    char kafka_ssl_key_password[256];         /* secret: the key's passphrase */
    char pg_dsn[1024];
    char http_addr[64];
    int http_port;
    int http_max_connections; /* producer: HTTP connections open at once */
    int http_reuse_port;      /* producer: SO_REUSEPORT on the HTTP port */
    char worker_id[64];
    char admin_token[256];
    char payment_token[256];
    char log_level[16];
    int kafka_message_timeout_ms;
    int kafka_linger_ms;   /* producer, reaper: librdkafka linger.ms */
    int clock_skew_max_ms; /* producer, reaper: bound on the offset from Redis's clock */
    int idem_ttl_s; /* producer, reaper: how long an Idempotency-Key (a restock's request id) pins
                     */
    int idem_refusal_ttl_s;       /* producer: how long it pins sold_out / limit_exceeded */
    int order_rate_limit;         /* producer: orders/s this worker admits to Redis; 0 = no limit */
    int user_rate_limit;          /* producer: order requests/s one user may make; 0 = no limit */
    int sale_shards_max;          /* producer: most shards an open may ask for (1..16) */
    int max_inflight;             /* producer: orders under way at once before answering 429 */
    int batch_max;                /* consumer: events applied in one PostgreSQL transaction */
    int batch_wait_ms;            /* consumer: how long a batch waits to fill up */
    int kafka_session_timeout_ms; /* consumer: how long the group waits for a silent member */
    int rebalance_drain_ms;       /* consumer: how long a revocation waits for batches to commit */
    int pg_statement_timeout_ms;  /* consumer: statement_timeout of its PostgreSQL sessions */
    int pg_lock_timeout_ms;       /* consumer: lock_timeout of its PostgreSQL sessions */
    int pg_idle_tx_timeout_ms;    /* consumer: idle_in_transaction_session_timeout of them */
    int reaper_interval_ms;       /* reaper: pause between two sweeps (expiry, returns) */
    int reaper_batch;             /* reaper: orders / ledger rows per transaction */
    int expiry_retry_ms;          /* reaper: re-publish an order.expired / order.voided after */
    int resv_sweep_interval_ms;   /* reaper: pause between two scans of the reservations */
    int resv_lost_after_ms;       /* reaper: an 'r:' reservation older than this is voided */
    int accepted_stale_after_ms;  /* reaper: an 'a:' entry of a stored order older than this goes */
    int accepted_lost_after_ms;   /* reaper: an 'a:' entry of no stored order is checked after */
    int reconcile_wait_ms;        /* reaper: how long reconcile waits for the consumer */
    int audit_wait_ms;            /* reaper audit: how long to wait for a quiet system */
    int audit_interval_ms;        /* reaper: how often the worker audits for its gauges */
    /* Positional arguments left after the flags (sub-commands such as `reaper audit`); they point
     * into argv. */
    int nargs;
    char *args[SP_CONFIG_ARGS_MAX];
} sp_config;

#define SP_CONFIG_OK   0
#define SP_CONFIG_EXIT 1 /* --help or --version was printed: exit 0 */

/* Fills *cfg for `worker` (one SP_WORKER_* bit): defaults first, then the environment, then
 * --name=value / --name value flags from argv (argv[0] is the program). An empty WORKER_ID becomes
 * the host name (the pod name on Kubernetes). Returns SP_CONFIG_OK, SP_CONFIG_EXIT after printing
 * --help to stdout, or -1 with one sentence naming the setting and the fix in errbuf. */
int sp_config_load(sp_config *cfg, unsigned worker, int argc, char **argv, const char *synopsis,
                   char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Copies s into out (always NUL-terminated, cut at outlen) with every credential hidden as ***:
 * a conninfo's password= and sslpassword= values (quoted or not, spaces around '='), and in a
 * URL (postgresql://, redis://...) the password of "user:password@" and any ...password=
 * query parameter. For every line that shows a DSN or URL. */
void sp_config_redact(const char *s, char *out, size_t outlen);

/* How much of a command-line argument a message may show, at most max characters: up to its
 * first '=' (a misspelt "--pg-dsn=postgresql://u:pw@h/db" must not print its password). For
 * printf's "%.*s". */
int sp_config_arg_shown(const char *arg, int max);

/* Prints the usage text: synopsis, then every setting of `worker` with its flag, environment
 * variable, default and bounds, from the same table the loader reads. */
void sp_config_usage(FILE *out, unsigned worker, const char *prog, const char *synopsis);

/* Logs the effective settings of `worker` at info level, secrets masked. */
void sp_config_log(const sp_config *cfg, unsigned worker);

#endif
