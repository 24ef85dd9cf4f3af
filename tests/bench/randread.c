// clone-randread: a small 4K random-read load generator for the guest (static, no libraries),
// used by tests/bench/vhost_user_blk.sh instead of fio, whose Debian package would drag
// librados, librbd, glusterfs and more into the benchmark initramfs.
//
//   clone-randread DEVICE [SECONDS] [THREADS] [BLOCK]
//
// THREADS threads (the queue depth) each pread() BLOCK bytes with O_DIRECT at uniformly
// random BLOCK-aligned offsets of DEVICE, for SECONDS after a 1-second warm-up. Prints one
// line: "randread: OPS ops in SECS s, IOPS iops, THREADS threads, BLOCK-byte blocks, ALL ops in
// all" (ALL counts the warm-up too).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char* device;
static uint64_t blocks;
static size_t block = 4096;
static atomic_int phase;  // 0 warm-up, 1 measuring, 2 stop
static atomic_uint_fast64_t measured;
static atomic_uint_fast64_t total;  // warm-up included: the unit for the guest's interrupt counts
static atomic_int failed;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t next(uint64_t* state) {  // xorshift64*
  uint64_t x = *state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static void* worker(void* arg) {
  uint64_t state = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
  int fd = open(device, O_RDONLY | O_DIRECT);
  if (fd < 0) {
    fprintf(stderr, "randread: open %s: %s\n", device, strerror(errno));
    failed = 1;
    return NULL;
  }
  void* buffer = NULL;
  if (posix_memalign(&buffer, 4096, block) != 0) {
    failed = 1;
    return NULL;
  }
  uint64_t count = 0, all = 0;
  for (;;) {
    int p = atomic_load(&phase);
    if (p == 2) break;
    off_t offset = (off_t)((next(&state) % blocks) * block);
    ssize_t n = pread(fd, buffer, block, offset);
    if (n != (ssize_t)block) {
      fprintf(stderr, "randread: pread %s at %lld: %s\n", device, (long long)offset,
              n < 0 ? strerror(errno) : "short read");
      failed = 1;
      break;
    }
    if (p == 1) ++count;
    ++all;
  }
  atomic_fetch_add(&measured, count);
  atomic_fetch_add(&total, all);
  free(buffer);
  close(fd);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 5) {
    fprintf(stderr, "usage: %s DEVICE [SECONDS] [THREADS] [BLOCK]\n", argv[0]);
    return 2;
  }
  device = argv[1];
  double seconds = argc > 2 ? atof(argv[2]) : 10;
  int threads = argc > 3 ? atoi(argv[3]) : 16;
  if (argc > 4) block = (size_t)atol(argv[4]);
  if (seconds <= 0 || threads < 1 || threads > 256 || block < 512 || block % 512 != 0) {
    fprintf(stderr, "randread: bad arguments\n");
    return 2;
  }
  int fd = open(device, O_RDONLY);
  if (fd < 0) {
    fprintf(stderr, "randread: open %s: %s\n", device, strerror(errno));
    return 1;
  }
  uint64_t bytes = 0;
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) bytes = 0;
  } else {
    bytes = (uint64_t)st.st_size;
  }
  close(fd);
  blocks = bytes / block;
  if (blocks == 0) {
    fprintf(stderr, "randread: %s is empty\n", device);
    return 1;
  }
  pthread_t* ids = calloc((size_t)threads, sizeof(pthread_t));
  for (int i = 0; i < threads; ++i) pthread_create(&ids[i], NULL, worker, (void*)(uintptr_t)i);
  usleep(1000000);  // warm-up
  double start = now();
  atomic_store(&phase, 1);
  usleep((useconds_t)(seconds * 1e6));
  atomic_store(&phase, 2);
  double elapsed = now() - start;
  for (int i = 0; i < threads; ++i) pthread_join(ids[i], NULL);
  if (failed) return 1;
  uint64_t ops = atomic_load(&measured);
  printf("randread: %llu ops in %.2f s, %.0f iops, %d threads, %zu-byte blocks, %llu ops in all\n",
         (unsigned long long)ops, elapsed, ops / elapsed, threads, block,
         (unsigned long long)atomic_load(&total));
  return 0;
}
