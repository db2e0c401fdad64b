/*
 * counter.c: forelock from C. Takes KEY ITERS times; holding it, adds one to
 * a counter in a plain file (read, then write: only the lock keeps it right)
 * and appends "<counter> <token>" to a log.
 *
 *   cc counter.c $(pkg-config --cflags --libs forelock) -o counter
 *   ./counter RUNTIME_DIR KEY ITERS COUNTER_FILE LOG_FILE
 *
 * RUNTIME_DIR "-" means the default ($FORELOCK_RUNTIME_DIR, ...).
 */
#include <forelock.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, int code) {
    fprintf(stderr, "counter: %s: %s (%s)\n", what, forelock_last_error(),
            forelock_strerror(code));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s RUNTIME_DIR KEY ITERS COUNTER_FILE LOG_FILE\n", argv[0]);
        return 64;
    }
    const char *dir = strcmp(argv[1], "-") == 0 ? NULL : argv[1];
    const char *key = argv[2];
    long iters = strtol(argv[3], NULL, 10);

    forelock_client *client;
    int rc = forelock_connect(dir, &client);
    if (rc != FORELOCK_OK) return fail("connect", rc);

    for (long i = 0; i < iters; i++) {
        forelock_guard *guard;
        rc = forelock_lock(client, key, &guard);
        if (rc != FORELOCK_OK) return fail("lock", rc);
        if (forelock_guard_previous_owner_died(guard))
            fprintf(stderr, "counter: the previous holder of %s died holding it\n", key);

        long counter = 0;
        FILE *f = fopen(argv[4], "r");
        if (f) {
            if (fscanf(f, "%ld", &counter) != 1) counter = 0;
            fclose(f);
        }
        counter++;
        f = fopen(argv[4], "w");
        if (!f) { perror(argv[4]); return 1; }
        fprintf(f, "%ld", counter);
        fclose(f);
        FILE *log = fopen(argv[5], "a");
        if (!log) { perror(argv[5]); return 1; }
        fprintf(log, "%ld %" PRIu64 "\n", counter, forelock_guard_token(guard));
        fclose(log);

        rc = forelock_release(guard);
        if (rc != FORELOCK_OK) return fail("release", rc);
    }
    forelock_client_free(client);
    printf("DONE\n");
    return 0;
}
