/* clock.h - the two clocks every worker reads: wall time (what events and rows carry) and
 * monotonic time (timeouts, intervals, latencies). */
#ifndef SP_CLOCK_H
#define SP_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Milliseconds since the epoch (CLOCK_REALTIME): for timestamps that leave the process. */
static inline int64_t sp_clock_wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Microseconds of CLOCK_MONOTONIC: for durations only; never goes back. */
static inline int64_t sp_clock_mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline int64_t sp_clock_mono_ms(void) { return sp_clock_mono_us() / 1000; }

#endif
