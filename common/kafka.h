/* kafka.h - Kafka clients (librdkafka) set up the one way all workers use, and event publishing. */
#ifndef SP_KAFKA_H
#define SP_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>

#include "config.h"
#include "event.h"

/* A configuration with what every client shares: bootstrap.servers, client.id, logs routed into
 * the JSON logger, and the security settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*,
 * KAFKA_SSL_*) of `security` (the worker's loaded settings; NULL: librdkafka's defaults,
 * plaintext, as in tests that talk to the local stack). The caller owns it until it hands it to
 * one of the _new functions. NULL with errbuf (naming the setting, never a secret) when a value
 * is refused. */
rd_kafka_conf_t *sp_kafka_conf_new(const char *brokers, const char *client_id,
                                   const sp_config *security, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Sets security.protocol, sasl.mechanisms, sasl.username, sasl.password, ssl.ca.location,
 * ssl.certificate.location, ssl.key.location, ssl.key.password from cfg's KAFKA_* security
 * settings that are set (sp_config_load checked that they agree). 0, or -1 with errbuf naming
 * the setting librdkafka refused (a secret's value and librdkafka's words on it are left out). */
int sp_kafka_conf_security(rd_kafka_conf_t *conf, const sp_config *cfg, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* rd_kafka_conf_set with the error into errbuf (the value left out for a property that holds a
 * secret: a password, a JAAS or OAuth config). */
int sp_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errbuf,
                      size_t errlen) __attribute__((warn_unused_result));

/* A producer that only counts a message as delivered once every in-sync replica has it
 * (acks=all) and never duplicates or reorders on retry (enable.idempotence). Takes ownership of
 * *conf on every path and sets *conf to NULL. NULL with errbuf on failure. */
rd_kafka_t *sp_kafka_producer_new(rd_kafka_conf_t **conf, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* A group consumer with manual offset handling (auto commit off: the stored position that matters
 * lives in PostgreSQL) and the main queue redirected to the consumer queue, so one
 * rd_kafka_consumer_poll serves everything. Takes ownership of *conf (set to NULL). */
rd_kafka_t *sp_kafka_consumer_new(rd_kafka_conf_t **conf, const char *group, char *errbuf,
                                  size_t errlen) __attribute__((warn_unused_result));

/* A metadata request for topic: 0 and *npartitions when the broker answered and every partition
 * has a leader; -1 with errbuf otherwise, which adds the last connection failure any client of
 * the process reported in the last 30 s (a refused SASL login, a certificate that did not
 * verify), so that /readyz says why. Blocks up to timeout_ms. */
int sp_kafka_topic_partitions(rd_kafka_t *rk, const char *topic, int timeout_ms, int *npartitions,
                              char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Encodes ev and enqueues it on topic with key = decimal sku_id (all events of one SKU go to one
 * partition, in order). msg_opaque comes back in the delivery report. 0 when queued; -1 with
 * errbuf when the event does not encode or the local queue refused it (e.g. full: poll, retry). */
int sp_kafka_produce_event(rd_kafka_t *rk, const char *topic, const sp_event *ev, void *msg_opaque,
                           char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* ---- the consumer side ---- */

/* Sends a message the consumer could not apply to the dead-letter topic dlq_topic: the original
 * key and value unchanged (either may be NULL), with headers that say why and where it came from:
 *   reason     the reason, as text
 *   topic      the topic it was read from
 *   partition  decimal partition
 *   offset     decimal offset
 * msg_opaque comes back in the delivery report. 0 when queued (librdkafka copies everything);
 * -1 with errbuf when the local queue refused it. */
int sp_kafka_produce_dead_letter(rd_kafka_t *rk, const char *dlq_topic, const char *src_topic,
                                 int32_t partition, int64_t offset, const void *key, size_t keylen,
                                 const void *value, size_t len, const char *reason,
                                 void *msg_opaque, char *errbuf, size_t errlen)
    __attribute__((warn_unused_result));

/* Creates topic with npartitions partitions and replication factor 1 through the admin API
 * (tests and benchmarks make topics of their own; production topics are made by operators).
 * Waits up to timeout_ms for the controller's answer. 0 when created; -1 with errbuf otherwise,
 * including when it exists already. */
int sp_kafka_topic_create(rd_kafka_t *rk, const char *topic, int npartitions, int timeout_ms,
                          char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Deletes topic through the admin API, waiting up to timeout_ms. 0 or -1 with errbuf. */
int sp_kafka_topic_delete(rd_kafka_t *rk, const char *topic, int timeout_ms, char *errbuf,
                          size_t errlen) __attribute__((warn_unused_result));

#endif
