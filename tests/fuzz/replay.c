/* replay.c - runs a fuzz target on given inputs, once each, without libFuzzer.
 *
 * Linked with one tests/fuzz/fuzz_*.c by the ordinary build (gcc, and with ASan+UBSan under
 * SAN=1), so the corpus and every regression input are checked even where clang is missing.
 * Usage: fuzz_TARGET FILE|DIR...  (a directory's regular files are read in name order). Prints one
 * line per directory or file argument and exits 0; a broken invariant aborts, a sanitizer report
 * exits non-zero. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Feeds one file to the target; -1 if it cannot be read. */
static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    uint8_t *data = NULL;
    size_t len = 0, cap = 0;
    int rc = -1;
    if (f == NULL) goto out;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            uint8_t *p = realloc(data, cap);
            if (p == NULL) goto out;
            data = p;
        }
        size_t n = fread(data + len, 1, cap - len, f);
        len += n;
        if (n == 0) break;
    }
    if (ferror(f)) goto out;
    /* An exactly sized copy, as libFuzzer gives: a read past the end is caught. */
    uint8_t *exact = malloc(len ? len : 1);
    if (exact == NULL) goto out;
    if (len) memcpy(exact, data, len);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    rc = 0;
out:
    if (f) fclose(f);
    free(data);
    if (rc != 0) fprintf(stderr, "cannot read %s\n", path);
    return rc;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

int main(int argc, char **argv) {
    int bad = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "cannot read %s\n", argv[i]);
            bad = 1;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            bad |= run_file(argv[i]) != 0;
            printf("%s: 1 input\n", argv[i]);
            continue;
        }
        struct dirent **names = NULL;
        int n = scandir(argv[i], &names, NULL, by_name), ran = 0;
        if (n < 0) {
            fprintf(stderr, "cannot list %s\n", argv[i]);
            bad = 1;
            continue;
        }
        for (int k = 0; k < n; k++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", argv[i], names[k]->d_name);
            if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
                bad |= run_file(path) != 0;
                ran++;
            }
            free(names[k]);
        }
        free(names);
        printf("%s: %d inputs\n", argv[i], ran);
    }
    return bad;
}
