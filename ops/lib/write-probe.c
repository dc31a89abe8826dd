// What receiving large writes costs the receiving thread, outside the gateway: a sender thread
// streams 1 MiB blocks over loopback TCP (as fio does), the receiver stores them at sequential
// 1 MiB offsets of a file, wrapping at 512 MiB. Mode "copy": recv into a buffer, then pwrite
// (what the gateway and nbdkit do). Mode "splice": socket -> pipe -> file with splice(2), which
// skips the receive copy into user memory. Prints MiB/s and the receiver thread's CPU seconds
// per GiB. Built and run by ops/probe-write.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MIB (1L << 20)
#define SPAN (512L * MIB)
static long total;
static struct sockaddr_in addr;

static void *sender(void *unused) {
  (void)unused;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  for (int i = 0; connect(s, (struct sockaddr *)&addr, sizeof addr) != 0; i++) {
    if (i > 1000) { perror("connect"); exit(1); }
    usleep(1000);
  }
  char *block = malloc(MIB);
  memset(block, 0x5a, MIB);
  for (long sent = 0; sent < total; sent += MIB) {
    for (long o = 0; o < MIB;) {
      long n = send(s, block + o, MIB - o, 0);
      if (n <= 0) { perror("send"); exit(1); }
      o += n;
    }
  }
  close(s);
  return NULL;
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
  if (argc != 4 || (strcmp(argv[1], "copy") && strcmp(argv[1], "splice"))) {
    fprintf(stderr, "usage: write-probe copy|splice FILE GIB\n");
    return 2;
  }
  int splicing = strcmp(argv[1], "splice") == 0;
  total = atol(argv[3]) * 1024 * MIB;
  int fd = open(argv[2], O_RDWR);
  if (fd < 0) { perror(argv[2]); return 1; }
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1) ||
      getsockname(listener, (struct sockaddr *)&addr, &len)) { perror("listen"); return 1; }
  pthread_t thread;
  pthread_create(&thread, NULL, sender, NULL);
  int c = accept(listener, NULL, NULL);
  char *buffer = malloc(MIB);
  int pipefd[2];
  if (pipe(pipefd) || fcntl(pipefd[1], F_SETPIPE_SZ, MIB) < 0) { perror("pipe"); return 1; }
  struct rusage before, after;
  struct timespec start, end;
  getrusage(RUSAGE_THREAD, &before);
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (long done = 0; done < total; done += MIB) {
    long offset = done % SPAN;
    for (long o = 0; o < MIB;) {
      if (!splicing) {
        long n = recv(c, buffer + o, MIB - o, 0);
        if (n <= 0) { perror("recv"); return 1; }
        o += n;
        continue;
      }
      long n = splice(c, NULL, pipefd[1], NULL, MIB - o, SPLICE_F_MOVE);
      if (n <= 0) { perror("splice from the socket"); return 1; }
      for (long left = n; left > 0;) {
        loff_t at = offset + o + (n - left);
        long w = splice(pipefd[0], NULL, fd, &at, left, SPLICE_F_MOVE);
        if (w <= 0) { perror("splice to the file"); return 1; }
        left -= w;
      }
      o += n;
    }
    if (!splicing && pwrite(fd, buffer, MIB, offset) != MIB) { perror("pwrite"); return 1; }
  }
  clock_gettime(CLOCK_MONOTONIC, &end);
  getrusage(RUSAGE_THREAD, &after);
  double elapsed = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
  double cpu = seconds(after.ru_utime) - seconds(before.ru_utime) + seconds(after.ru_stime) - seconds(before.ru_stime);
  double gib = (double)total / (1024 * MIB);
  printf("%-6s %6.0f MiB/s, receiver %.3f CPU s/GiB\n", argv[1], gib * 1024 / elapsed, cpu / gib);
  pthread_join(thread, NULL);
  return 0;
}
