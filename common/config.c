/* config.c - every setting of every worker, loaded from the environment and --flags.
 *
 * One table names each setting once: its flag, environment variable, type, default, bounds, which
 * workers use it and its help text. Loading, --help and the startup log all read that table
 * (as redis's config.c does), so they cannot disagree.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <libpq-fe.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "event.h"
#include "log.h"

#ifndef SP_VERSION
#define SP_VERSION "dev"
#endif

typedef enum { CONF_STR, CONF_INT } conf_type;

#define CONF_SECRET   1u /* never printed */
#define CONF_REQUIRED 2u /* must be non-empty for the workers that use it */

typedef struct conf_opt {
    const char *flag; /* without the leading "--" */
    const char *env;
    conf_type type;
    size_t offset, size; /* where in sp_config; size of a string's buffer */
    const char *def;     /* default, as text */
    long long min, max;  /* bounds of an integer */
    unsigned workers, flags;
    const char *help;
} conf_opt;

#define STR(field) CONF_STR, offsetof(sp_config, field), sizeof(((sp_config *)0)->field)
#define INT(field) CONF_INT, offsetof(sp_config, field), sizeof(int)
#define P          SP_WORKER_PRODUCER
#define C          SP_WORKER_CONSUMER
#define R          SP_WORKER_REAPER
#define T          SP_WORKER_TOOL

/* clang-format off */
static const conf_opt conf_table[] = {
    {"redis-url", "REDIS_URL", STR(redis_url), "redis://127.0.0.1:6379", 0, 0, P|C|R|T, 0,
     "Redis: redis://[:password@]host:port[/db] or sentinel://host:port[,host:port...]/master"},
    {"kafka-brokers", "KAFKA_BROKERS", STR(kafka_brokers), "127.0.0.1:9092", 0, 0, P|C|R|T, 0,
     "Kafka bootstrap brokers: host:port[,host:port...]"},
    {"kafka-topic", "KAFKA_TOPIC", STR(kafka_topic), "stockpipe.events", 0, 0, P|C|R|T, 0,
     "The events topic (message key = sku_id)"},
    {"kafka-dlq-topic", "KAFKA_DLQ_TOPIC", STR(kafka_dlq_topic), "stockpipe.events.dlq", 0, 0,
     C|T, 0, "Dead-letter topic for events that cannot be applied"},
    {"kafka-group", "KAFKA_GROUP", STR(kafka_group), "stockpipe-consumer", 0, 0, C, 0,
     "Kafka consumer group shared by all consumers"},
    {"kafka-security-protocol", "KAFKA_SECURITY_PROTOCOL", STR(kafka_security_protocol),
     "plaintext", 0, 0, P|C|R|T, 0,
     "How every Kafka client talks to the brokers: plaintext, ssl (TLS), sasl_plaintext or "
     "sasl_ssl (SASL login over TLS: a managed cluster's usual)"},
    {"kafka-sasl-mechanism", "KAFKA_SASL_MECHANISM", STR(kafka_sasl_mechanism), "", 0, 0,
     P|C|R|T, 0,
     "SASL mechanism of the sasl_* protocols: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN"},
    {"kafka-sasl-username", "KAFKA_SASL_USERNAME", STR(kafka_sasl_username), "", 0, 0, P|C|R|T, 0,
     "SASL user name (sasl_* protocols)"},
    {"kafka-sasl-password", "KAFKA_SASL_PASSWORD", STR(kafka_sasl_password), "", 0, 0, P|C|R|T,
     CONF_SECRET,
     "SASL password (sasl_* protocols); set it in the environment (a flag shows in ps)"},
    {"kafka-ssl-ca-location", "KAFKA_SSL_CA_LOCATION", STR(kafka_ssl_ca_location), "", 0, 0,
     P|C|R|T, 0,
     "PEM file (or directory) of the CA certificates the brokers' certificates are verified with "
     "(ssl, sasl_ssl); unset: the system's CA store. The broker's host name is verified too"},
    {"kafka-ssl-certificate-location", "KAFKA_SSL_CERTIFICATE_LOCATION",
     STR(kafka_ssl_certificate_location), "", 0, 0, P|C|R|T, 0,
     "Mutual TLS: PEM file of this client's certificate (with KAFKA_SSL_KEY_LOCATION)"},
    {"kafka-ssl-key-location", "KAFKA_SSL_KEY_LOCATION", STR(kafka_ssl_key_location), "", 0, 0,
     P|C|R|T, 0,
     "Mutual TLS: PEM file of this client's private key (with KAFKA_SSL_CERTIFICATE_LOCATION)"},
    {"kafka-ssl-key-password", "KAFKA_SSL_KEY_PASSWORD", STR(kafka_ssl_key_password), "", 0, 0,
     P|C|R|T, CONF_SECRET,
     "Mutual TLS: passphrase of an encrypted KAFKA_SSL_KEY_LOCATION; set it in the environment"},
    {"pg-dsn", "PG_DSN", STR(pg_dsn), "", 0, 0, P|C|R|T, CONF_REQUIRED,
     "PostgreSQL libpq conninfo, e.g. 'host=db port=5432 dbname=stockpipe user=stockpipe' or a "
     "postgresql:// URI; TLS: sslmode=verify-full sslrootcert=/path/ca.pem (passwords in it are "
     "never shown)"},
    {"http-addr", "HTTP_ADDR", STR(http_addr), "0.0.0.0", 0, 0, P|C|R, 0,
     "Address the HTTP server binds"},
    {"http-port", "HTTP_PORT", INT(http_port), "8080", 1, 65535, P|C|R, 0,
     "HTTP port: the API on the producer; /healthz /readyz /metrics on every worker"},
    {"http-max-connections", "HTTP_MAX_CONNECTIONS", INT(http_max_connections), "10000", 1,
     1000000, P, 0,
     "HTTP connections open at once; one more is answered 503 and closed at once (slow or idle "
     "clients cannot take the server from the others; keep it below the open-files limit)"},
    {"http-reuse-port", "HTTP_REUSE_PORT", INT(http_reuse_port), "0", 0, 1, P, 0,
     "1: listen with SO_REUSEPORT, so several producers on one host share HTTP_PORT and the "
     "kernel spreads connections over them (one per core, like pgbouncer's so_reuseport)"},
    {"worker-id", "WORKER_ID", STR(worker_id), "", 0, 0, P|C|R, 0,
     "Unique name of this worker in the fleet (default: the host name, i.e. the pod name)"},
    {"admin-token", "ADMIN_TOKEN", STR(admin_token), "", 0, 0, P, CONF_SECRET,
     "Bearer token of the admin API (open a sale, restock)"},
    {"payment-token", "PAYMENT_TOKEN", STR(payment_token), "", 0, 0, P, CONF_SECRET,
     "Bearer token of the payment provider's callback"},
    {"kafka-message-timeout-ms", "KAFKA_MESSAGE_TIMEOUT_MS", INT(kafka_message_timeout_ms), "10000",
     1000, 300000, P|R, 0,
     "How long the producer waits for Kafka to acknowledge an event before it gives up; the "
     "reaper treats reservations older than this (plus a margin) as lost"},
    {"kafka-linger-ms", "KAFKA_LINGER_MS", INT(kafka_linger_ms), "1", 0, 1000, P|R, 0,
     "How long librdkafka lets an event wait to share a request with others: more is bigger "
     "batches for the broker, less is a quicker 202"},
    {"order-rate-limit", "ORDER_RATE_LIMIT", INT(order_rate_limit), "0", 0, 10000000, P, 0,
     "Orders per second this producer lets through to Redis (token bucket, burst = one second's "
     "worth); above it POST /v1/orders answers 429. 0 = no limit"},
    {"user-rate-limit", "USER_RATE_LIMIT", INT(user_rate_limit), "50", 0, 1000000, P, 0,
     "Order requests per second one user_id may make on this producer (burst = one second's "
     "worth); above it 429. 0 = no limit"},
    {"sale-shards-max", "SALE_SHARDS_MAX", INT(sale_shards_max), "16", 1, SP_SHARDS_MAX, P, 0,
     "Most Redis shards an open (POST /v1/skus \"shards\") may spread a hot SKU's stock over; "
     "more is refused with 400. 1 allows no sharded sale"},
    {"max-inflight", "MAX_INFLIGHT", INT(max_inflight), "50000", 1, 10000000, P, 0,
     "Orders under way at once (waiting for Redis or Kafka) before new ones are refused with 429; "
     "bounds the producer's memory"},
    {"batch-max", "BATCH_MAX", INT(batch_max), "5000", 1, 100000, C, 0,
     "Most events the consumer applies in one PostgreSQL transaction"},
    {"batch-wait-ms", "BATCH_WAIT_MS", INT(batch_wait_ms), "20", 0, 10000, C, 0,
     "How long the consumer lets a batch fill up before applying it"},
    {"kafka-session-timeout-ms", "KAFKA_SESSION_TIMEOUT_MS", INT(kafka_session_timeout_ms),
     "10000", 6000, 300000, C, 0,
     "How long the consumer group waits for a member that stopped answering (crashed, killed, cut "
     "off) before giving its partitions to the others"},
    {"rebalance-drain-ms", "REBALANCE_DRAIN_MS", INT(rebalance_drain_ms), "10000", 100, 240000,
     C, 0,
     "How long a consumer losing its partitions in a rebalance waits for the batches it read to "
     "commit; the whole group waits for it meanwhile. A batch PostgreSQL has not committed by "
     "then is let go (the partitions' next owner reads it again; nothing is applied twice)"},
    {"pg-statement-timeout-ms", "PG_STATEMENT_TIMEOUT_MS", INT(pg_statement_timeout_ms), "30000",
     100, 3600000, C, 0,
     "PostgreSQL's statement_timeout on the consumer's sessions; the consumer itself gives up on "
     "a statement not answered 2 s past it (a stalled server) and closes the connection"},
    {"pg-lock-timeout-ms", "PG_LOCK_TIMEOUT_MS", INT(pg_lock_timeout_ms), "10000", 100, 3600000,
     C, 0,
     "PostgreSQL's lock_timeout on the consumer's sessions: how long a batch waits for a row "
     "another session holds (a partition's offsets row of its previous owner) before it is "
     "rolled back and read again later"},
    {"pg-idle-in-transaction-timeout-ms", "PG_IDLE_IN_TRANSACTION_TIMEOUT_MS",
     INT(pg_idle_tx_timeout_ms), "60000", 1000, 3600000, C, 0,
     "PostgreSQL's idle_in_transaction_session_timeout on the consumer's sessions: the server "
     "ends a session left inside a transaction this long (a hung or cut-off consumer), so its "
     "row locks go; keep it above 20000 (dead letters are sent inside the transaction)"},
    {"reaper-interval-ms", "REAPER_INTERVAL_MS", INT(reaper_interval_ms), "1000", 10, 600000, R, 0,
     "Pause between two sweeps of the reaper (expire unpaid orders, give returns back to Redis, "
     "check Redis for lost data)"},
    {"reaper-batch", "REAPER_BATCH", INT(reaper_batch), "500", 1, 10000, R, 0,
     "Orders expired, or ledger rows given back to Redis, per short PostgreSQL transaction"},
    {"expiry-retry-ms", "EXPIRY_RETRY_MS", INT(expiry_retry_ms), "30000", 1000, 86400000, R, 0,
     "How long the reaper waits for an order.expired or order.voided it published to be applied "
     "before it publishes it again"},
    {"resv-sweep-interval-ms", "RESV_SWEEP_INTERVAL_MS", INT(resv_sweep_interval_ms), "5000", 10,
     600000, R, 0,
     "Pause between two scans of every SKU's reservations in Redis (lost reservations, leftover "
     "entries, vanished sales)"},
    {"resv-lost-after-ms", "RESV_LOST_AFTER_MS", INT(resv_lost_after_ms), "40000", 2000,
     86400000, R, 0,
     "A reservation Kafka has not answered for this long is treated as lost and voided; must "
     "exceed KAFKA_MESSAGE_TIMEOUT_MS by at least 1000 (its age is measured on Redis's clock, "
     "whatever the hosts' clocks say)"},
    {"idem-ttl-s", "IDEM_TTL_S", INT(idem_ttl_s), "86400", 60, 2592000, P|R, 0,
     "How long an Idempotency-Key pins its order: a retry with the key meanwhile answers the "
     "first order (in_progress while Kafka has not answered, then accepted); also how long "
     "Redis remembers a restock's request id (set it alike on producers and reapers)"},
    {"idem-refusal-ttl-s", "IDEM_REFUSAL_TTL_S", INT(idem_refusal_ttl_s), "30", 0, 86400, P, 0,
     "How long an Idempotency-Key pins a sold_out or limit_exceeded answer; 0 pins none, so "
     "every retry is decided afresh (a buyer retrying after a restock may get a unit)"},
    {"clock-skew-max-ms", "CLOCK_SKEW_MAX_MS", INT(clock_skew_max_ms), "1000", 10, 3600000, P|R,
     0,
     "How far this worker's clock may be from Redis's (measured every second with TIME) before "
     "it says so in its log and /readyz: an order's pay deadline comes from the producer's clock"},
    {"accepted-stale-after-ms", "ACCEPTED_STALE_AFTER_MS", INT(accepted_stale_after_ms), "60000",
     1000, 86400000, R, 0,
     "An accepted entry in Redis whose order PostgreSQL stored this long ago is a leftover (the "
     "consumer's clean-up was lost) and is dropped"},
    {"accepted-lost-after-ms", "ACCEPTED_LOST_AFTER_MS", INT(accepted_lost_after_ms), "300000",
     1000, 86400000, R, 0,
     "An accepted entry whose order PostgreSQL still lacks after this long is checked against "
     "the log: if the consumer has passed its offset, the event is gone (retention, a lost "
     "disk) and the order is voided, its units given back"},
    {"reconcile-wait-ms", "RECONCILE_WAIT_MS", INT(reconcile_wait_ms), "60000", 1000, 3600000, R,
     0,
     "How long a reconcile waits for the consumer to store a paused SKU's partition up to its end "
     "before it gives up (the SKU stays closed and is tried again)"},
    {"audit-wait-ms", "AUDIT_WAIT_MS", INT(audit_wait_ms), "30000", 0, 3600000, R, 0,
     "How long `reaper audit` waits for the system to become quiet before comparing Redis with "
     "PostgreSQL"},
    {"audit-interval-ms", "AUDIT_INTERVAL_MS", INT(audit_interval_ms), "60000", 1000, 86400000, R,
     0,
     "How often the running reaper audits PostgreSQL (units oversold or leaked) and Redis against "
     "it (the stock of each quiet sale) for its stockpipe_reaper_audit_* gauges"},
    {"log-level", "LOG_LEVEL", STR(log_level), "info", 0, 0, P|C|R|T, 0,
     "debug, info, warn or error"},
};
/* clang-format on */

#define NOPTS (sizeof(conf_table) / sizeof(conf_table[0]))

/* Stores text into the setting; -1 with the reason when it does not parse or fit. */
static int set_value(sp_config *cfg, const conf_opt *o, const char *text, const char *source,
                     char *errbuf, size_t errlen) {
    char *field = (char *)cfg + o->offset;
    if (o->type == CONF_STR) {
        size_t n = strlen(text);
        if (n >= o->size) {
            snprintf(errbuf, errlen, "%s (%s) is %zu bytes long; at most %zu are allowed", o->env,
                     source, n, o->size - 1);
            return -1;
        }
        memcpy(field, text, n + 1);
        return 0;
    }
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    /* strtoll would skip leading blanks; a setting is exactly a number or it is wrong. */
    int starts_ok = (text[0] >= '0' && text[0] <= '9') || text[0] == '-';
    if (!starts_ok || errno != 0 || end == text || *end != '\0' || v < o->min || v > o->max) {
        snprintf(errbuf, errlen, "%s (%s) is \"%s\"; it must be an integer from %lld to %lld",
                 o->env, source, text, o->min, o->max);
        return -1;
    }
    *(int *)(void *)field = (int)v;
    return 0;
}

static const conf_opt *find_flag(const char *name, size_t namelen, unsigned worker) {
    for (size_t i = 0; i < NOPTS; i++)
        if ((conf_table[i].workers & worker) && strlen(conf_table[i].flag) == namelen &&
            memcmp(conf_table[i].flag, name, namelen) == 0)
            return &conf_table[i];
    return NULL;
}

/* Keeps a positional argument for the worker; -1 past the bound. */
static int add_arg(sp_config *cfg, char *arg, const char *prog, char *errbuf, size_t errlen) {
    if (cfg->nargs >= SP_CONFIG_ARGS_MAX) {
        snprintf(errbuf, errlen, "too many arguments (at most %d); see %s --help",
                 SP_CONFIG_ARGS_MAX, prog);
        return -1;
    }
    cfg->args[cfg->nargs++] = arg;
    return 0;
}

static int uses(unsigned worker, const char *env) {
    for (size_t i = 0; i < NOPTS; i++)
        if (strcmp(conf_table[i].env, env) == 0) return (conf_table[i].workers & worker) != 0;
    return 0;
}

/* name (namelen bytes, no NUL) ends with "password", case aside. */
static int ends_password(const char *name, size_t namelen) {
    return namelen >= 8 && strncasecmp(name + namelen - 8, "password", 8) == 0;
}

/* A --flag name that is not this worker's but would carry a secret: another worker's secret
 * setting, or any name that says password (or a misspelling of it), token or secret. */
static int secret_flag(const char *name, size_t namelen) {
    char low[64];
    if (namelen >= sizeof(low)) namelen = sizeof(low) - 1;
    for (size_t i = 0; i < namelen; i++) low[i] = (char)tolower((unsigned char)name[i]);
    low[namelen] = '\0';
    for (size_t i = 0; i < NOPTS; i++)
        if ((conf_table[i].flags & CONF_SECRET) && strcmp(conf_table[i].flag, low) == 0) return 1;
    static const char *const words[] = {"pass", "pasw", "pwd", "token", "secret"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (strstr(low, words[i])) return 1;
    return 0;
}

static void set_case(char *s, int upper) {
    for (; *s; s++) *s = (char)(upper ? toupper((unsigned char)*s) : tolower((unsigned char)*s));
}

static int one_of(const char *s, const char *const *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(s, list[i]) == 0) return 1;
    return 0;
}

/* -1 with errbuf naming the setting when the file (or directory) at path cannot be read by this
 * process; what follows the setting's name ("" or e.g. "'s sslrootcert"). */
static int check_readable(const char *env, const char *what, const char *path, char *errbuf,
                          size_t errlen) {
    if (access(path, R_OK) == 0) return 0;
    snprintf(errbuf, errlen,
             "%s%s is \"%s\", which this worker cannot read (%s); fix the path or the file's "
             "owner and mode",
             env, what, path, strerror(errno));
    return -1;
}

static const char *const kafka_protocols[] = {"plaintext", "ssl", "sasl_plaintext", "sasl_ssl"};
static const char *const sasl_mechanisms[] = {"SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"};
#define NELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* The Kafka security settings agree with each other and their files can be read; normalizes the
 * protocol (lower-case; empty is plaintext) and mechanism (upper-case). Nothing secret goes into
 * errbuf. */
static int check_kafka_security(sp_config *cfg, char *errbuf, size_t errlen) {
    set_case(cfg->kafka_security_protocol, 0);
    set_case(cfg->kafka_sasl_mechanism, 1);
    /* Empty is not set, as for the other security settings (an empty key of a Secret). */
    if (cfg->kafka_security_protocol[0] == '\0') strcpy(cfg->kafka_security_protocol, "plaintext");
    const char *proto = cfg->kafka_security_protocol;
    if (!one_of(proto, kafka_protocols, NELEMS(kafka_protocols))) {
        snprintf(errbuf, errlen,
                 "KAFKA_SECURITY_PROTOCOL is \"%.40s\"; use plaintext, ssl, sasl_plaintext or "
                 "sasl_ssl",
                 proto);
        return -1;
    }
    int sasl = strncmp(proto, "sasl_", 5) == 0;
    int tls = strcmp(proto, "ssl") == 0 || strcmp(proto, "sasl_ssl") == 0;
    if (sasl) {
        const char *missing = !cfg->kafka_sasl_mechanism[0]  ? "KAFKA_SASL_MECHANISM"
                              : !cfg->kafka_sasl_username[0] ? "KAFKA_SASL_USERNAME"
                              : !cfg->kafka_sasl_password[0] ? "KAFKA_SASL_PASSWORD"
                                                             : NULL;
        if (missing) {
            snprintf(errbuf, errlen,
                     "KAFKA_SECURITY_PROTOCOL=%s needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME "
                     "and KAFKA_SASL_PASSWORD; %s is not set",
                     proto, missing);
            return -1;
        }
        if (!one_of(cfg->kafka_sasl_mechanism, sasl_mechanisms, NELEMS(sasl_mechanisms))) {
            snprintf(errbuf, errlen,
                     "KAFKA_SASL_MECHANISM is \"%.40s\"; use SCRAM-SHA-512, SCRAM-SHA-256 or "
                     "PLAIN (the one the cluster's user was made for)",
                     cfg->kafka_sasl_mechanism);
            return -1;
        }
    } else {
        const char *extra = cfg->kafka_sasl_mechanism[0]  ? "KAFKA_SASL_MECHANISM"
                            : cfg->kafka_sasl_username[0] ? "KAFKA_SASL_USERNAME"
                            : cfg->kafka_sasl_password[0] ? "KAFKA_SASL_PASSWORD"
                                                          : NULL;
        if (extra) {
            snprintf(errbuf, errlen,
                     "%s is set but KAFKA_SECURITY_PROTOCOL is %s, which sends no SASL login; set "
                     "KAFKA_SECURITY_PROTOCOL=sasl_ssl (or sasl_plaintext), or unset %s",
                     extra, proto, extra);
            return -1;
        }
    }
    const struct {
        const char *env, *value;
    } ssl[] = {
        {"KAFKA_SSL_CA_LOCATION", cfg->kafka_ssl_ca_location},
        {"KAFKA_SSL_CERTIFICATE_LOCATION", cfg->kafka_ssl_certificate_location},
        {"KAFKA_SSL_KEY_LOCATION", cfg->kafka_ssl_key_location},
        {"KAFKA_SSL_KEY_PASSWORD", cfg->kafka_ssl_key_password},
    };
    for (size_t i = 0; !tls && i < NELEMS(ssl); i++)
        if (ssl[i].value[0]) {
            snprintf(errbuf, errlen,
                     "%s is set but KAFKA_SECURITY_PROTOCOL is %s, which does not use TLS; set "
                     "KAFKA_SECURITY_PROTOCOL=ssl or sasl_ssl, or unset %s",
                     ssl[i].env, proto, ssl[i].env);
            return -1;
        }
    if (!cfg->kafka_ssl_certificate_location[0] != !cfg->kafka_ssl_key_location[0]) {
        snprintf(errbuf, errlen,
                 "KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION go together (mutual "
                 "TLS): set both or neither");
        return -1;
    }
    if (cfg->kafka_ssl_key_password[0] && !cfg->kafka_ssl_key_location[0]) {
        snprintf(errbuf, errlen,
                 "KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_KEY_LOCATION; set the key's "
                 "file (and KAFKA_SSL_CERTIFICATE_LOCATION) or unset it");
        return -1;
    }
    /* "probe": librdkafka looks for the system's CA store in the usual places. */
    for (size_t i = 0; i < 3; i++)
        if (ssl[i].value[0] && !(i == 0 && strcmp(ssl[i].value, "probe") == 0) &&
            check_readable(ssl[i].env, "", ssl[i].value, errbuf, errlen) != 0)
            return -1;
    return 0;
}

/* The DSN parses as libpq will parse it, so no libpq error at connect time quotes a piece of it
 * (libpq's parse errors do: 'missing "=" after "..."'); its sslmode is one libpq knows and the
 * files it names can be read. libpq's reason is shown only when the DSN holds no password. */
/* A postgresql:// URI with an '@' in its path, past the end of its authority (the first '/', '?'
 * or '#' after "://") and before its query: the user:password@ held a '/', libpq takes the user
 * info for a host and port, and its connect errors would quote what is really the password. (A
 * '?' in it leaves a query libpq cannot parse: refused above, without libpq's words.) */
static int uri_userinfo_misread(const char *dsn) {
    const char *p = NULL;
    if (strncmp(dsn, "postgresql://", 13) == 0)
        p = dsn + 13;
    else if (strncmp(dsn, "postgres://", 11) == 0)
        p = dsn + 11;
    if (p == NULL) return 0;
    size_t authority = strcspn(p, "/?#");
    if (memchr(p, '@', authority) != NULL) return 0; /* user info read as such */
    const char *path = p + authority;
    return memchr(path, '@', strcspn(path, "?")) != NULL;
}

static int check_pg_dsn(const char *dsn, char *errbuf, size_t errlen) {
    static const char *const modes[] = {"disable", "allow",     "prefer",
                                        "require", "verify-ca", "verify-full"};
    static const char *const files[] = {"sslrootcert", "sslcert", "sslkey", "sslcrl"};
    char *msg = NULL, shown[sizeof(((sp_config *)0)->pg_dsn) + 64];
    PQconninfoOption *opts = PQconninfoParse(dsn, &msg);
    int rc = -1;
    if (opts == NULL) {
        sp_config_redact(dsn, shown, sizeof(shown));
        if (msg && strcmp(shown, dsn) == 0 && strcasestr(dsn, "password") == NULL) {
            msg[strcspn(msg, "\n")] = '\0';
            snprintf(errbuf, errlen,
                     "PG_DSN is not a libpq conninfo (%s); write keyword=value pairs (a value "
                     "with spaces in single quotes) or a postgresql:// URI",
                     msg);
        } else {
            snprintf(errbuf, errlen,
                     "PG_DSN is not a libpq conninfo (libpq's reason is not shown: it may quote "
                     "the password); write keyword=value pairs (a value with spaces or quotes in "
                     "single quotes, with \\' and \\\\ inside) or a postgresql:// URI (reserved "
                     "characters percent-encoded)");
        }
        goto out;
    }
    if (uri_userinfo_misread(dsn)) {
        snprintf(errbuf, errlen,
                 "PG_DSN is a URI whose user:password@ libpq would not read as such (a '/' in it "
                 "ends the host part first, and libpq's errors would then quote the password); "
                 "percent-encode reserved characters ('/' as %%2F) or write keyword=value pairs");
        goto out;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (o->val == NULL || o->val[0] == '\0') continue;
        if (strcmp(o->keyword, "sslmode") == 0 && !one_of(o->val, modes, NELEMS(modes))) {
            snprintf(errbuf, errlen,
                     "PG_DSN's sslmode is \"%.40s\"; use disable, allow, prefer, require, "
                     "verify-ca or verify-full (verify-full: the server's certificate and name "
                     "are checked against sslrootcert)",
                     o->val);
            goto out;
        }
        for (size_t i = 0; i < NELEMS(files); i++) {
            char what[32];
            if (strcmp(o->keyword, files[i]) != 0 || strcmp(o->val, "system") == 0) continue;
            snprintf(what, sizeof(what), "'s %s", files[i]);
            if (check_readable("PG_DSN", what, o->val, errbuf, errlen) != 0) goto out;
        }
    }
    rc = 0;
out:
    if (msg) PQfreemem(msg);
    if (opts) PQconninfoFree(opts);
    return rc;
}

void sp_config_usage(FILE *out, unsigned worker, const char *prog, const char *synopsis) {
    fprintf(out, "Usage: %s [options]%s%s\n\n", prog, synopsis && *synopsis ? " " : "",
            synopsis ? synopsis : "");
    fprintf(out, "Every option can also be set by its environment variable; a flag wins.\n\n");
    for (size_t i = 0; i < NOPTS; i++) {
        const conf_opt *o = &conf_table[i];
        if (!(o->workers & worker)) continue;
        fprintf(out, "  --%s=%s  (env %s)\n      %s", o->flag, o->type == CONF_INT ? "N" : "VALUE",
                o->env, o->help);
        if (o->type == CONF_INT) fprintf(out, "; %lld..%lld", o->min, o->max);
        if (o->flags & CONF_REQUIRED)
            fprintf(out, "; required");
        else if (o->def[0])
            fprintf(out, "; default %s", o->def);
        fprintf(out, "\n");
    }
    fprintf(out,
            "  --help     print this text and exit\n  --version  print the version and exit\n");
}

int sp_config_load(sp_config *cfg, unsigned worker, int argc, char **argv, const char *synopsis,
                   char *errbuf, size_t errlen) {
    const char *prog = (argc > 0 && argv[0]) ? argv[0] : "stockpipe";
    memset(cfg, 0, sizeof(*cfg));

    for (size_t i = 0; i < NOPTS; i++) {
        const conf_opt *o = &conf_table[i];
        if (set_value(cfg, o, o->def, "default", errbuf, errlen) != 0) return -1;
        const char *env = getenv(o->env);
        if ((o->workers & worker) && env != NULL &&
            set_value(cfg, o, env, "environment", errbuf, errlen) != 0)
            return -1;
    }

    int only_args = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_args || a[0] != '-' || a[1] != '-') {
            if (strcmp(a, "-h") == 0) {
                sp_config_usage(stdout, worker, prog, synopsis);
                return SP_CONFIG_EXIT;
            }
            if (!only_args && a[0] == '-' && a[1] != '\0') {
                /* Up to any '=' only: "-kafka-sasl-password=..." must not print the password. */
                snprintf(errbuf, errlen, "unknown option \"%.*s\"; see %s --help",
                         (int)strcspn(a, "="), a, prog);
                return -1;
            }
            if (add_arg(cfg, argv[i], prog, errbuf, errlen) != 0) return -1;
            continue;
        }
        if (a[2] == '\0') { /* "--" ends the options */
            only_args = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0) {
            sp_config_usage(stdout, worker, prog, synopsis);
            return SP_CONFIG_EXIT;
        }
        if (strcmp(a, "--version") == 0) {
            printf("stockpipe %s\n", SP_VERSION);
            return SP_CONFIG_EXIT;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t namelen = eq ? (size_t)(eq - name) : strlen(name);
        const conf_opt *o = find_flag(name, namelen, worker);
        if (o == NULL && secret_flag(name, namelen)) {
            /* Left as an argument, the worker's "unexpected argument" would print the value. */
            snprintf(errbuf, errlen,
                     "option --%.*s is not a setting of %s (its value is not shown); see %s --help",
                     (int)namelen, name, prog, prog);
            return -1;
        }
        if (o == NULL) {
            /* Sub-command flags (e.g. --sku of `reaper reconcile`) are the worker's to read. */
            if (add_arg(cfg, argv[i], prog, errbuf, errlen) != 0) return -1;
            continue;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (value == NULL) {
            if (i + 1 >= argc) {
                snprintf(errbuf, errlen, "option --%s needs a value (--%s=VALUE)", o->flag,
                         o->flag);
                return -1;
            }
            value = argv[++i];
        }
        if (set_value(cfg, o, value, "flag", errbuf, errlen) != 0) return -1;
    }

    if (cfg->worker_id[0] == '\0') {
        char host[sizeof(cfg->worker_id)];
        if (gethostname(host, sizeof(host)) != 0) snprintf(host, sizeof(host), "worker");
        host[sizeof(host) - 1] = '\0';
        memcpy(cfg->worker_id, host, sizeof(host));
    }
    sp_log_level level;
    if (sp_log_level_parse(cfg->log_level, &level) != 0) {
        snprintf(errbuf, errlen, "LOG_LEVEL is \"%s\"; use debug, info, warn or error",
                 cfg->log_level);
        return -1;
    }
    for (size_t i = 0; i < NOPTS; i++) {
        const conf_opt *o = &conf_table[i];
        if ((o->workers & worker) && (o->flags & CONF_REQUIRED) &&
            ((char *)cfg + o->offset)[0] == '\0') {
            snprintf(errbuf, errlen, "%s is not set; set it in the environment or pass --%s=VALUE",
                     o->env, o->flag);
            return -1;
        }
    }
    if (uses(worker, "KAFKA_SECURITY_PROTOCOL") && check_kafka_security(cfg, errbuf, errlen) != 0)
        return -1;
    if (uses(worker, "PG_DSN") && cfg->pg_dsn[0] && check_pg_dsn(cfg->pg_dsn, errbuf, errlen) != 0)
        return -1;
    return SP_CONFIG_OK;
}

/* An output buffer that stops at its bound (always NUL-terminated). */
typedef struct outbuf {
    char *p;
    size_t len, cap;
} outbuf;

static void put(outbuf *b, const char *s, size_t n) {
    if (b->len + 1 >= b->cap) return;
    if (n > b->cap - 1 - b->len) n = b->cap - 1 - b->len;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

/* s starts with "scheme://" (postgresql://, redis://, sentinel://). */
static const char *url_rest(const char *s) {
    const char *p = s;
    if (!isalpha((unsigned char)*p)) return NULL;
    while (isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.') p++;
    return strncmp(p, "://", 3) == 0 ? p + 3 : NULL;
}

/* A URL query parameter's name [k, k+n), percent-decoded, ends with "password". */
static int query_key_is_password(const char *k, size_t n) {
    char dec[64];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 1 < sizeof(dec); i++) {
        if (k[i] == '%' && i + 2 < n && isxdigit((unsigned char)k[i + 1]) &&
            isxdigit((unsigned char)k[i + 2])) {
            char hex[3] = {k[i + 1], k[i + 2], '\0'};
            dec[o++] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            dec[o++] = k[i];
        }
    }
    return ends_password(dec, o);
}

static void redact_url(const char *s, const char *auth, outbuf *b) {
    /* The user info ends at the first '@' before the path; a password with an unencoded '/', '?'
     * or '#' pushes that '@' further on: then the last '@' of all ends it (hiding too much is
     * the safe way to be wrong). */
    size_t authlen = strcspn(auth, "/?#");
    const char *at = memchr(auth, '@', authlen);
    if (at == NULL) at = strrchr(auth, '@');
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    const char *p = s;
    if (colon) { /* user:password@ */
        put(b, s, (size_t)(colon + 1 - s));
        put(b, "***", 3);
        p = at;
    }
    const char *q = strchr(p, '?');
    if (q == NULL) {
        put(b, p, strlen(p));
        return;
    }
    put(b, p, (size_t)(q + 1 - p));
    for (p = q + 1; *p;) { /* name=value&...: the value of any ...password hidden */
        size_t n = strcspn(p, "&");
        const char *eq = memchr(p, '=', n);
        if (eq && query_key_is_password(p, (size_t)(eq - p))) {
            put(b, p, (size_t)(eq + 1 - p));
            put(b, "***", 3);
        } else {
            put(b, p, n);
        }
        p += n;
        if (*p == '&') put(b, p++, 1);
    }
}

/* libpq's conninfo syntax: keyword = value, white space around '=' allowed, a value in single
 * quotes or not, a backslash escaping the next character in either. Words that are not
 * keyword=value (a broker list, a plain name) are copied as they are. */
static void redact_conninfo(const char *s, outbuf *b) {
    const char *p = s;
    while (*p) {
        const char *start = p;
        while (isspace((unsigned char)*p)) p++;
        const char *kw = p;
        while (*p && *p != '=' && !isspace((unsigned char)*p)) p++;
        size_t kwlen = (size_t)(p - kw);
        const char *q = p;
        while (isspace((unsigned char)*q)) q++;
        if (*q != '=') {
            put(b, start, (size_t)(p - start));
            continue;
        }
        for (q++; isspace((unsigned char)*q); q++) {}
        const char *v = q;
        if (*q == '\'') {
            for (q++; *q && *q != '\''; q++)
                if (*q == '\\' && q[1]) q++;
            if (*q) q++;
        } else {
            for (; *q && !isspace((unsigned char)*q); q++)
                if (*q == '\\' && q[1]) q++;
        }
        if (ends_password(kw, kwlen)) {
            put(b, start, (size_t)(v - start));
            put(b, "***", 3);
        } else {
            put(b, start, (size_t)(q - start));
        }
        p = q;
    }
}

void sp_config_redact(const char *s, char *out, size_t outlen) {
    outbuf b = {out, 0, outlen};
    if (outlen == 0) return;
    out[0] = '\0';
    const char *auth = url_rest(s);
    if (auth)
        redact_url(s, auth, &b);
    else
        redact_conninfo(s, &b);
}

void sp_config_log(const sp_config *cfg, unsigned worker) {
    for (size_t i = 0; i < NOPTS; i++) {
        const conf_opt *o = &conf_table[i];
        const char *field = (const char *)cfg + o->offset;
        if (!(o->workers & worker)) continue;
        if (o->type == CONF_INT)
            sp_info("config %s=%d", o->env, *(const int *)(const void *)field);
        else if (o->flags & CONF_SECRET)
            sp_info("config %s=%s", o->env, field[0] ? "(set)" : "(not set)");
        else {
            char shown[1100];
            sp_config_redact(field, shown, sizeof(shown));
            sp_info("config %s=%s", o->env, shown);
        }
    }
    if (uses(worker, "KAFKA_SECURITY_PROTOCOL") &&
        strcmp(cfg->kafka_security_protocol, "sasl_plaintext") == 0 &&
        strcmp(cfg->kafka_sasl_mechanism, "PLAIN") == 0)
        sp_warn("config: KAFKA_SASL_MECHANISM=PLAIN over KAFKA_SECURITY_PROTOCOL=sasl_plaintext "
                "sends the Kafka password unencrypted; use sasl_ssl");
}

int sp_config_arg_shown(const char *arg, int max) {
    size_t n = strcspn(arg, "=");
    return n < (size_t)max ? (int)n : max;
}
