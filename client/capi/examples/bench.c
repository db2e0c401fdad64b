/*
 * bench.c: prepared acquire+release through the C ABI, ns per op.
 *
 *   cc bench.c $(pkg-config --cflags --libs forelock) -o bench
 *   ./bench RUNTIME_DIR [ITERS]
 */
#include <forelock.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s RUNTIME_DIR [ITERS]\n", argv[0]);
        return 64;
    }
    long iters = argc > 2 ? strtol(argv[2], NULL, 10) : 1000000;
    forelock_client *client;
    if (forelock_connect(argv[1], &client) != FORELOCK_OK) {
        fprintf(stderr, "%s\n", forelock_last_error());
        return 1;
    }
    forelock_guard *g;
    for (int i = 0; i < 2000; i++) { /* let the broker prepare the key */
        if (forelock_lock(client, "bench:c", &g) != FORELOCK_OK) return 1;
        forelock_release(g);
        usleep(100);
    }
    double best = 1e18;
    for (int round = 0; round < 3; round++) {
        double start = now_ns();
        for (long i = 0; i < iters; i++) {
            forelock_lock(client, "bench:c", &g);
            forelock_release(g);
        }
        double per = (now_ns() - start) / iters;
        if (per < best) best = per;
    }
    printf("forelock (C ABI) %.0f ns/op\n", best);
    forelock_client_free(client);
    return 0;
}
