/*
 * contract.c: the C ABI's contract, checked against a real forelockd by
 * tests/tests/bindings.rs (compiled with gcc -Wall -Wextra -Werror, linked
 * once against the cdylib and once against the staticlib).
 *
 *   ./contract RUNTIME_DIR     prints "C CONTRACT OK" and exits 0
 */
#include <forelock.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "contract.c:%d: check failed: %s (last error: %s)\n",   \
                    __LINE__, #cond, forelock_last_error());                        \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

#define THREADS 4
#define THREAD_ITERS 200

static forelock_client *shared_client;
static long counter;

static void *count(void *arg) {
    (void)arg;
    uint64_t last = 0;
    for (int i = 0; i < THREAD_ITERS; i++) {
        forelock_guard *g;
        CHECK(forelock_lock(shared_client, "c:threads", &g) == FORELOCK_OK);
        uint64_t token = forelock_guard_token(g);
        CHECK(token > last);
        last = token;
        long seen = counter; /* not atomic: only the lock keeps it right */
        counter = seen + 1;
        CHECK(forelock_release(g) == FORELOCK_OK);
    }
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    const char *dir = argv[1];
    forelock_client *a, *b;
    forelock_guard *g, *h;

    /* Errors: a code, its name, and the client's message. */
    CHECK(forelock_connect("/nonexistent/forelock", &a) == FORELOCK_E_BROKER_NOT_RUNNING);
    CHECK(strstr(forelock_last_error(), "not running") != NULL);
    CHECK(strstr(forelock_strerror(FORELOCK_E_TIMEOUT), "FORELOCK_E_TIMEOUT") != NULL);
    CHECK(strcmp(forelock_strerror(12345), "unknown forelock error code") == 0);
    CHECK(forelock_connect(dir, NULL) == FORELOCK_E_INVALID_ARGUMENT);

    CHECK(forelock_connect(dir, &a) == FORELOCK_OK);
    CHECK(forelock_connect(dir, &b) == FORELOCK_OK);
    CHECK(forelock_lock(a, "", &g) == FORELOCK_E_KEY);
    CHECK(forelock_lock(a, NULL, &g) == FORELOCK_E_INVALID_ARGUMENT);

    /* Exclusive: a holds, b's try and timeout fail, then b gets it. */
    CHECK(forelock_lock(a, "c:key", &g) == FORELOCK_OK);
    uint64_t first = forelock_guard_token(g);
    CHECK(first > 0);
    CHECK(!forelock_guard_previous_owner_died(g));
    CHECK(!forelock_guard_is_shared(g));
    CHECK(forelock_guard_check(g) == FORELOCK_OK);
    CHECK(forelock_guard_check(NULL) == FORELOCK_E_INVALID_ARGUMENT);
    CHECK(forelock_try_lock(b, "c:key", &h) == FORELOCK_E_WOULD_BLOCK);
    CHECK(strstr(forelock_last_error(), "c:key") != NULL);
    CHECK(forelock_lock_timeout(b, "c:key", 50, &h) == FORELOCK_E_TIMEOUT);
    CHECK(forelock_release(g) == FORELOCK_OK);
    CHECK(forelock_lock_timeout(b, "c:key", 5000, &h) == FORELOCK_OK);
    CHECK(forelock_guard_token(h) > first);
    CHECK(forelock_release(h) == FORELOCK_OK);
    CHECK(forelock_release(NULL) == FORELOCK_E_INVALID_ARGUMENT);

    /* Shared: two readers at once, a writer kept out. */
    CHECK(forelock_lock_shared(a, "c:shared", &g) == FORELOCK_OK);
    CHECK(forelock_guard_is_shared(g));
    CHECK(forelock_try_lock_shared(b, "c:shared", &h) == FORELOCK_OK);
    forelock_guard *w;
    CHECK(forelock_try_lock(b, "c:shared", &w) == FORELOCK_E_WOULD_BLOCK);
    CHECK(forelock_lock_shared_timeout(b, "c:shared", 10, &w) == FORELOCK_OK);
    CHECK(forelock_release(w) == FORELOCK_OK);
    CHECK(forelock_release(g) == FORELOCK_OK);
    CHECK(forelock_release(h) == FORELOCK_OK);

    /* A guard outlives the freed client handle. */
    CHECK(forelock_lock(b, "c:outlive", &h) == FORELOCK_OK);
    forelock_client_free(b);
    CHECK(forelock_release(h) == FORELOCK_OK);

    /* One client shared by threads: mutual exclusion, rising tokens. */
    shared_client = a;
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&threads[i], NULL, count, NULL) == 0);
    for (int i = 0; i < THREADS; i++) CHECK(pthread_join(threads[i], NULL) == 0);
    CHECK(counter == THREADS * THREAD_ITERS);

    forelock_client_free(a);
    forelock_client_free(NULL);
    printf("C CONTRACT OK\n");
    return 0;
}
