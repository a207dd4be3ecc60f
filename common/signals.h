/* signals.h - SIGTERM/SIGINT handling: the first asks for a graceful drain, the second exits
 * now. */
#ifndef SP_SIGNALS_H
#define SP_SIGNALS_H

/* Installs handlers for SIGTERM and SIGINT and ignores SIGPIPE (a client that hangs up must never
 * kill a worker). The handlers only count signals; the main loop polls sp_signal_stop_requested()
 * with a short timeout and does the draining itself, since almost nothing is safe to do inside a
 * handler. A second SIGTERM/SIGINT calls _exit(1) at once (as pgbouncer does). */
int sp_signal_install(void) __attribute__((warn_unused_result));

/* Nonzero once SIGTERM or SIGINT arrived (or sp_signal_request_stop was called). */
int sp_signal_stop_requested(void);

/* Asks for a graceful stop from the program itself (a fatal condition found at run time). */
void sp_signal_request_stop(void);

#endif
