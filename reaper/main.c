/* reaper/main.c - the reaper worker: expires unpaid orders, gives their stock back to Redis
 * exactly once, voids lost reservations and rebuilds Redis after it lost data; `reaper reconcile`
 * and `reaper audit` by hand (reaper/reaper.c, docs/reaper.md). */
#include "log.h"
#include "reaper.h"
#include "worker.h"

int main(int argc, char **argv) {
    sp_config cfg;
    sp_reaper_opts opts;
    char err[256];
    int status = 2;
    if (sp_worker_setup("reaper", SP_WORKER_REAPER, argc, argv, SP_REAPER_SYNOPSIS, &cfg,
                        &status) != 0)
        return status;
    if (sp_reaper_parse_args(cfg.nargs, cfg.args, &opts, err, sizeof(err)) != 0) {
        sp_error("cannot start: %s; see reaper --help", err);
        return 2;
    }
    sp_config_log(&cfg, SP_WORKER_REAPER);
    return sp_reaper_run(&cfg, &opts);
}
