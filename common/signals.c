/* signals.c - SIGTERM/SIGINT handling: the first asks for a graceful drain, the second exits
 * now. */
#include "signals.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop_signals = 0;

static void on_stop_signal(int sig) {
    (void)sig;
    if (stop_signals++ > 0) _exit(1); /* second signal: the operator wants it gone now */
}

int sp_signal_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) != 0 || sigaction(SIGINT, &sa, NULL) != 0) return -1;
    sa.sa_handler = SIG_IGN;
    if (sigaction(SIGPIPE, &sa, NULL) != 0) return -1;
    return 0;
}

int sp_signal_stop_requested(void) { return stop_signals > 0; }

void sp_signal_request_stop(void) {
    if (stop_signals == 0) stop_signals = 1;
}
