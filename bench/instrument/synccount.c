/* synccount.c - LD_PRELOAD shim for run_bench.py's counted pass: counts fsync, fdatasync,
 * sync_file_range and syncfs per process and per file name, then calls the real function.
 *
 * With FLOWD_BENCH_COUNT_DIR set, the first such call in a process (and in each forked
 * child) creates <dir>/<pid>-<monotonic ns>.sync, a memory-mapped table of
 * SLOTS x {char name[64]; int64 counts[4]} (layout read by benchcount.py). The counters
 * are updated in place, so the file is current at any moment and survives _exit/kill.
 * The file name is the basename of /proc/self/fd/N at the time of the call.
 *
 * Build: cc -O2 -shared -fPIC -o synccount.so synccount.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 32
#define NAME 64
enum { K_FSYNC, K_FDATASYNC, K_SYNC_FILE_RANGE, K_SYNCFS, NK };
struct slot { char name[NAME]; int64_t n[NK]; };

static struct slot *table;
static pid_t table_pid;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void after_fork_child(void) {
    pthread_mutex_init(&lock, NULL);
    table = NULL; /* the parent's mapping stays mapped, unused */
    table_pid = 0;
}

__attribute__((constructor)) static void synccount_init(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static struct slot *open_table(void) { /* lock held */
    pid_t pid = getpid();
    if (table != NULL && table_pid == pid) return table;
    const char *dir = getenv("FLOWD_BENCH_COUNT_DIR");
    if (dir == NULL || *dir == '\0') return NULL;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char path[4096];
    snprintf(path, sizeof path, "%s/%d-%lld.sync", dir, (int)pid,
             (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return NULL;
    size_t size = SLOTS * sizeof(struct slot);
    if (ftruncate(fd, (off_t)size) != 0) { close(fd); return NULL; }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return NULL;
    table = p;
    table_pid = pid;
    return table;
}

static void count(int fd, int kind) {
    char link[64], target[4096];
    const char *base = "?";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, target, sizeof target - 1);
    if (len > 0) {
        target[len] = '\0';
        char *slash = strrchr(target, '/');
        base = slash != NULL && slash[1] != '\0' ? slash + 1 : target;
    }
    pthread_mutex_lock(&lock);
    struct slot *t = open_table();
    if (t != NULL) {
        int i;
        for (i = 0; i < SLOTS - 1; i++) {
            if (t[i].name[0] == '\0') {
                size_t n = strlen(base) < NAME - 1 ? strlen(base) : NAME - 1;
                memcpy(t[i].name, base, n);
                t[i].name[n] = '\0';
                break;
            }
            if (strncmp(t[i].name, base, NAME - 1) == 0) break;
        }
        if (i == SLOTS - 1 && t[i].name[0] == '\0') strcpy(t[i].name, "(other)");
        t[i].n[kind]++;
    }
    pthread_mutex_unlock(&lock);
}

typedef int (*fd_fn)(int);
typedef int (*range_fn)(int, off64_t, off64_t, unsigned int);

static fd_fn real_fsync, real_fdatasync, real_syncfs;
static range_fn real_sync_file_range;

int fsync(int fd) {
    if (real_fsync == NULL) real_fsync = (fd_fn)dlsym(RTLD_NEXT, "fsync");
    int r = real_fsync(fd), e = errno;
    count(fd, K_FSYNC);
    errno = e;
    return r;
}

int fdatasync(int fd) {
    if (real_fdatasync == NULL) real_fdatasync = (fd_fn)dlsym(RTLD_NEXT, "fdatasync");
    int r = real_fdatasync(fd), e = errno;
    count(fd, K_FDATASYNC);
    errno = e;
    return r;
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    if (real_sync_file_range == NULL) real_sync_file_range = (range_fn)dlsym(RTLD_NEXT, "sync_file_range");
    int r = real_sync_file_range(fd, offset, nbytes, flags), e = errno;
    count(fd, K_SYNC_FILE_RANGE);
    errno = e;
    return r;
}

int syncfs(int fd) {
    if (real_syncfs == NULL) real_syncfs = (fd_fn)dlsym(RTLD_NEXT, "syncfs");
    int r = real_syncfs(fd), e = errno;
    count(fd, K_SYNCFS);
    errno = e;
    return r;
}
