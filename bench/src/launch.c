/* launch: run one program and report its own resource use.
 *
 *   launch -r REPORT [-t SECONDS] [VAR=VALUE ...] -- program [args ...]
 *
 * Forks, sets VAR=VALUE in the child's environment only (e.g. LD_PRELOAD, so the
 * launcher itself never runs on the allocator under test), execs the program, waits
 * for it with wait4 and writes one line to REPORT:
 *   LAUNCH status=exit:N|signal:N|timeout wall_s=... maxrss_kib=... minflt=... ...
 *
 * Why not measure from Python directly: Linux records the high-water RSS of the memory
 * image a process leaves at exec, so a child forked from the Python runner reports
 * max RSS >= the runner's own RSS. Forked from this small launcher, the child's
 * ru_maxrss starts from the launcher's ~1 MiB and is its own peak.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static volatile sig_atomic_t g_child;
static volatile sig_atomic_t g_timed_out;

static void on_alarm(int sig) {
    (void)sig;
    g_timed_out = 1;
    if (g_child > 0) kill(g_child, SIGKILL);
}

static void usage(void) {
    fprintf(stderr, "usage: launch -r REPORT [-t SECONDS] [VAR=VALUE ...] -- program [args ...]\n");
    exit(126);
}

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec * 1e-6; }

int main(int argc, char **argv) {
    const char *report = NULL;
    int timeout = 0;
    int i = 1;
    char *set[64];
    int nset = 0;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "-r") == 0 && i + 1 < argc) {
            report = argv[++i];
        } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            timeout = atoi(argv[++i]);
        } else if (strchr(argv[i], '=') && nset < 64) {
            set[nset++] = argv[i];
        } else {
            usage();
        }
    }
    if (!report || i >= argc) usage();

    /* the child's environment: ours, with the VAR=VALUE settings replacing or added */
    size_t nenv = 0;
    while (environ[nenv]) nenv++;
    char **env = calloc(nenv + (size_t)nset + 1, sizeof *env);
    if (!env) return 126;
    size_t k = 0;
    for (size_t e = 0; e < nenv; e++) {
        int replaced = 0;
        for (int s = 0; s < nset; s++) {
            size_t n = (size_t)(strchr(set[s], '=') - set[s]) + 1;
            if (strncmp(environ[e], set[s], n) == 0) replaced = 1;
        }
        if (!replaced) env[k++] = environ[e];
    }
    for (int s = 0; s < nset; s++) env[k++] = set[s];
    env[k] = NULL;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0) {
        perror("launch: fork");
        return 126;
    }
    if (pid == 0) {
        execve(argv[i], &argv[i], env);
        fprintf(stderr, "launch: cannot run %s: %s\n", argv[i], strerror(errno));
        _exit(127);
    }
    g_child = pid;
    if (timeout > 0) alarm((unsigned)timeout);
    int status = 0;
    struct rusage ru;
    pid_t r;
    do {
        r = wait4(pid, &status, 0, &ru);
    } while (r < 0 && errno == EINTR);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    alarm(0);
    if (r < 0) {
        perror("launch: wait4");
        return 126;
    }

    char st[32];
    if (g_timed_out)
        snprintf(st, sizeof st, "timeout");
    else if (WIFSIGNALED(status))
        snprintf(st, sizeof st, "signal:%d", WTERMSIG(status));
    else
        snprintf(st, sizeof st, "exit:%d", WEXITSTATUS(status));
    FILE *f = fopen(report, "w");
    if (!f) {
        perror("launch: report");
        return 126;
    }
    fprintf(f,
            "LAUNCH status=%s wall_s=%.6f maxrss_kib=%ld minflt=%ld majflt=%ld utime_s=%.6f "
            "stime_s=%.6f nvcsw=%ld nivcsw=%ld\n",
            st, (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9,
            ru.ru_maxrss, ru.ru_minflt, ru.ru_majflt, tv_s(ru.ru_utime), tv_s(ru.ru_stime),
            ru.ru_nvcsw, ru.ru_nivcsw);
    fclose(f);
    return 0;
}
