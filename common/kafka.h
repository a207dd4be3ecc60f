/* kafka.h - Kafka clients (librdkafka) set up the one way all workers use, and event publishing. */
#ifndef SP_KAFKA_H
#define SP_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <stddef.h>

#include "event.h"

/* A configuration with what every client shares: bootstrap.servers, client.id, logs routed into
 * the JSON logger. The caller owns it until it hands it to one of the _new functions. */
rd_kafka_conf_t *sp_kafka_conf_new(const char *brokers, const char *client_id, char *errbuf,
                                   size_t errlen) __attribute__((warn_unused_result));

/* rd_kafka_conf_set with the error into errbuf. */
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
 * has a leader; -1 with errbuf otherwise. Blocks up to timeout_ms. */
int sp_kafka_topic_partitions(rd_kafka_t *rk, const char *topic, int timeout_ms, int *npartitions,
                              char *errbuf, size_t errlen) __attribute__((warn_unused_result));

/* Encodes ev and enqueues it on topic with key = decimal sku_id (all events of one SKU go to one
 * partition, in order). msg_opaque comes back in the delivery report. 0 when queued; -1 with
 * errbuf when the event does not encode or the local queue refused it (e.g. full: poll, retry). */
int sp_kafka_produce_event(rd_kafka_t *rk, const char *topic, const sp_event *ev, void *msg_opaque,
                           char *errbuf, size_t errlen) __attribute__((warn_unused_result));

#endif
