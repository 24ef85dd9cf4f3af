/* clone-agent: the guest agent (docs/AGENT.md). A small static program in the guest
 * initramfs, started by /init before the console marker. It listens on AF_VSOCK port 1024
 * and serves each connection in its own process: PING, EXEC (a command with its stdin,
 * stdout and stderr streamed over the connection) and IDENTITY (hostname, RNG seed, wall
 * clock, applied and read back).
 *
 *   clone-agent [--port N] [--daemon]
 *
 * --daemon detaches (fork, setsid) once the socket listens, so /init can go on knowing
 * that a host connecting from now on will be served. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent_protocol.h"

#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

static const char* const kDefaultEnv[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                                          "TERM=linux", NULL};

static void logf_(const char* format, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char* format, ...) {
  va_list args;
  va_start(args, format);
  fputs("clone-agent: ", stderr);
  vfprintf(stderr, format, args);
  fputc('\n', stderr);
  va_end(args);
}

/* ---- socket I/O ---- */

static int write_all(int fd, const void* data, size_t n) {
  const uint8_t* p = data;
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* 1 read, 0 clean EOF before any byte, -1 error or EOF mid-way. */
static int read_all(int fd, void* data, size_t n) {
  uint8_t* p = data;
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, p + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (r == 0) return got == 0 ? 0 : -1;
    got += (size_t)r;
  }
  return 1;
}

static int send_frame(int fd, uint16_t type, const void* payload, size_t n) {
  uint8_t header[CA_HEADER_SIZE];
  ca_encode_header(header, type, (uint32_t)n);
  if (write_all(fd, header, sizeof header) < 0) return -1;
  return n ? write_all(fd, payload, n) : 0;
}

static void send_error(int fd, int error, const char* format, ...) __attribute__((format(printf, 3, 4)));
static void send_error(int fd, int error, const char* format, ...) {
  char text[CA_MAX_ERROR_TEXT + 1];
  va_list args;
  va_start(args, format);
  vsnprintf(text, sizeof text, format, args);
  va_end(args);
  uint8_t payload[4 + CA_MAX_ERROR_TEXT];
  long n = ca_encode_error(payload, sizeof payload, error, text);
  if (n >= 0) send_frame(fd, CA_ERROR, payload, (size_t)n);
}

/* Reads one frame into buffer (CA_MAX_PAYLOAD bytes). 1 read, 0 clean EOF, -1 broken or
 * malformed (an ERROR frame has been sent for malformed ones). */
static int read_frame(int fd, struct ca_header* header, uint8_t* buffer) {
  uint8_t raw[CA_HEADER_SIZE];
  int r = read_all(fd, raw, sizeof raw);
  if (r <= 0) return r;
  int status = ca_decode_header(raw, header);
  if (status != CA_OK) {
    send_error(fd, EPROTO, "bad frame header: %s", ca_status_text(status));
    return -1;
  }
  if (header->length && read_all(fd, buffer, header->length) != 1) return -1;
  return 1;
}

/* ---- EXEC ---- */

struct pending {
  uint8_t data[CA_MAX_PAYLOAD];
  size_t offset, length;
};

static void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void close_fd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

/* Forwards what a pipe has; returns 0 at EOF (pipe closed), 1 otherwise, -1 if the host is
 * gone. */
static int forward_output(int conn, int* fd, uint16_t type, uint8_t* buffer) {
  ssize_t n = read(*fd, buffer, CA_MAX_PAYLOAD);
  if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 1 : (close_fd(fd), 0);
  if (n == 0) {
    close_fd(fd);
    return 0;
  }
  return send_frame(conn, type, buffer, (size_t)n) < 0 ? -1 : 1;
}

/* Forwards everything buffered in a pipe, then closes it (the command has ended). */
static void drain_output(int conn, int* fd, uint16_t type, uint8_t* buffer) {
  while (*fd >= 0) {
    ssize_t n = read(*fd, buffer, CA_MAX_PAYLOAD);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || send_frame(conn, type, buffer, (size_t)n) < 0) close_fd(fd);
  }
}

/* Starts the command with posix_spawn: the C library's vfork-style clone shares this
 * handler's memory until the exec, so no page tables are copied and no page of ours is
 * copied on write in between (in a fork, every such page is one more the guest writes).
 * Returns the pid, or -1 with errno (the exec's own error: ENOENT for a missing command). */
static pid_t spawn_command(const struct ca_exec* exec, int in, int out, int err) {
  char* const* env = exec->has_env ? exec->env : (char* const*)kDefaultEnv;
  /* posix_spawnp searches the PATH of our environment: the command's for this one search. */
  const char* our_path = getenv("PATH");
  char* saved_path = our_path ? strdup(our_path) : NULL;
  for (char* const* e = env; *e; ++e) {
    if (strncmp(*e, "PATH=", 5) == 0) setenv("PATH", *e + 5, 1);
  }
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attributes;
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in, 0);
  posix_spawn_file_actions_adddup2(&actions, out, 1);
  posix_spawn_file_actions_adddup2(&actions, err, 2);
  posix_spawnattr_init(&attributes);
  /* Its own session (a signal to its group reaches what it starts), no signal blocked, every
   * disposition the default. */
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setsigdefault(&attributes, &all);
  pid_t pid;
  int error = posix_spawnp(&pid, exec->argv[0], &actions, &attributes, exec->argv, env);
  if (saved_path) setenv("PATH", saved_path, 1);
  else unsetenv("PATH");
  free(saved_path);
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    errno = error;
    return -1;
  }
  return pid;
}

static int run_exec(int conn, const struct ca_exec* exec) {
  int in[2], out[2], err[2];
  if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
    send_error(conn, errno, "pipe: %s", strerror(errno));
    return 1;
  }
  pid_t pid = spawn_command(exec, in[0], out[1], err[1]);
  int spawn_error = errno;
  close(in[0]);
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    send_error(conn, spawn_error, "exec %s: %s", exec->argv[0], strerror(spawn_error));
    close(in[1]);
    close(out[0]);
    close(err[0]);
    return 1;
  }

  int stdin_fd = in[1], stdout_fd = out[0], stderr_fd = err[0];
  set_nonblocking(stdin_fd);
  set_nonblocking(stdout_fd);
  set_nonblocking(stderr_fd);
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  static struct pending stdin_pending;
  static uint8_t buffer[CA_MAX_PAYLOAD];
  stdin_pending.offset = stdin_pending.length = 0;
  int stdin_eof = 0, exited = 0, status = 0;

  while (!exited) {
    struct pollfd fds[5];
    int n = 0, conn_i = -1, in_i = -1, out_i = -1, err_i = -1, pid_i = -1;
    int have_pending = stdin_pending.offset < stdin_pending.length;
    if (!have_pending) {  /* backpressure: read stdin frames only when the last is written */
      conn_i = n;
      fds[n++] = (struct pollfd){conn, POLLIN, 0};
    }
    if (have_pending && stdin_fd >= 0) {
      in_i = n;
      fds[n++] = (struct pollfd){stdin_fd, POLLOUT, 0};
    }
    if (stdout_fd >= 0) {
      out_i = n;
      fds[n++] = (struct pollfd){stdout_fd, POLLIN, 0};
    }
    if (stderr_fd >= 0) {
      err_i = n;
      fds[n++] = (struct pollfd){stderr_fd, POLLIN, 0};
    }
    if (pidfd >= 0) {
      pid_i = n;
      fds[n++] = (struct pollfd){pidfd, POLLIN, 0};
    }
    int ready = poll(fds, (nfds_t)n, pidfd >= 0 ? -1 : 100);
    if (ready < 0 && errno != EINTR) break;
    if (ready < 0) continue;

    if (conn_i >= 0 && fds[conn_i].revents) {
      struct ca_header header;
      int r = read_frame(conn, &header, stdin_pending.data);
      if (r <= 0) {
        /* The host hung up or broke the protocol: the command goes with the connection. */
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return 1;
      }
      if (header.type == CA_STDIN) {
        if (stdin_fd >= 0 && !stdin_eof) {
          stdin_pending.offset = 0;
          stdin_pending.length = header.length;
        }
      } else if (header.type == CA_STDIN_EOF) {
        stdin_eof = 1;
      } else {
        send_error(conn, EPROTO, "unexpected frame type %u during EXEC", header.type);
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return 1;
      }
    }
    if (stdin_fd >= 0 && stdin_pending.offset < stdin_pending.length &&
        (in_i < 0 || fds[in_i].revents)) {
      ssize_t w = write(stdin_fd, stdin_pending.data + stdin_pending.offset,
                        stdin_pending.length - stdin_pending.offset);
      if (w > 0) {
        stdin_pending.offset += (size_t)w;
      } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
        /* The command closed its stdin: drop what it will never read. */
        close_fd(&stdin_fd);
        stdin_pending.offset = stdin_pending.length = 0;
      }
    }
    if (stdin_fd < 0) stdin_pending.offset = stdin_pending.length = 0;
    if (stdin_eof && stdin_fd >= 0 && stdin_pending.offset >= stdin_pending.length) close_fd(&stdin_fd);
    if (out_i >= 0 && fds[out_i].revents && forward_output(conn, &stdout_fd, CA_STDOUT, buffer) < 0) break;
    if (err_i >= 0 && fds[err_i].revents && forward_output(conn, &stderr_fd, CA_STDERR, buffer) < 0) break;
    if (pid_i < 0 || fds[pid_i].revents) {
      pid_t w = waitpid(pid, &status, pidfd >= 0 ? 0 : WNOHANG);
      if (w == pid) exited = 1;
    }
  }
  if (!exited) {  /* the host went away mid-command */
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 1;
  }
  /* Output the command wrote before it ended is still in the pipes; what background
   * processes it left write later is not forwarded. */
  drain_output(conn, &stdout_fd, CA_STDOUT, buffer);
  drain_output(conn, &stderr_fd, CA_STDERR, buffer);
  close_fd(&stdin_fd);
  if (pidfd >= 0) close(pidfd);
  struct ca_exit result = {0, 0};
  if (WIFEXITED(status)) result.value = WEXITSTATUS(status);
  else {
    result.kind = 1;
    result.value = WTERMSIG(status);
  }
  uint8_t payload[CA_EXIT_SIZE];
  ca_encode_exit(payload, &result);
  send_frame(conn, CA_EXIT, payload, sizeof payload);
  return 0;
}

/* ---- IDENTITY ---- */

static int read_int_file(const char* path) {
  FILE* f = fopen(path, "re");
  if (!f) return -1;
  int value = -1;
  if (fscanf(f, "%d", &value) != 1) value = -1;
  fclose(f);
  return value;
}

static void apply_identity(int conn, const struct ca_identity* id) {
  struct ca_identity_result res;
  memset(&res, 0, sizeof res);
  if (id->fields & CA_ID_HOSTNAME) {
    if (sethostname(id->hostname, id->hostname_length) != 0) {
      res.hostname_error = errno;
    } else {
      FILE* f = fopen("/etc/hostname", "we");
      if (!f || fprintf(f, "%s\n", id->hostname) < 0 || fclose(f) != 0) res.hostname_error = errno ? errno : EIO;
      else res.applied |= CA_ID_HOSTNAME;
    }
  }
  if (id->fields & CA_ID_SEED) {
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
      res.seed_error = errno;
    } else {
      struct {
        struct rand_pool_info info;
        uint8_t bytes[CA_MAX_SEED];
      } pool;
      pool.info.entropy_count = (int)(id->seed_length * 8);  /* credited, in bits */
      pool.info.buf_size = (int)id->seed_length;
      memcpy(pool.info.buf, id->seed, id->seed_length);
      if (ioctl(fd, RNDADDENTROPY, &pool) != 0) res.seed_error = errno;
      else res.applied |= CA_ID_SEED;
      res.reseed_error = ioctl(fd, RNDRESEEDCRNG) == 0 ? 0 : errno;
      close(fd);
    }
  }
  if (id->fields & CA_ID_CLOCK) {
    struct timespec ts = {(time_t)id->clock_seconds, (long)id->clock_nanoseconds};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0) res.clock_error = errno;
    else res.applied |= CA_ID_CLOCK;
  }
  res.entropy_avail = read_int_file("/proc/sys/kernel/random/entropy_avail");
  uint8_t probe;
  ssize_t g = getrandom(&probe, 1, GRND_NONBLOCK);
  res.crng_ready = g == 1 ? 1 : (errno == EAGAIN ? 0 : -1);
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  res.clock_seconds = now.tv_sec;
  res.clock_nanoseconds = (uint32_t)now.tv_nsec;
  struct utsname names;
  if (uname(&names) == 0) {
    size_t n = strnlen(names.nodename, CA_MAX_HOSTNAME);
    memcpy(res.hostname, names.nodename, n);
    res.hostname_length = (uint32_t)n;
  }
  uint8_t payload[CA_IDENTITY_RESULT_MAX_SIZE];
  long n = ca_encode_identity_result(payload, sizeof payload, &res);
  if (n >= 0) send_frame(conn, CA_IDENTITY_RESULT, payload, (size_t)n);
}

/* ---- one connection ---- */

static int serve(int conn) {
  static uint8_t payload[CA_MAX_PAYLOAD];
  struct ca_header header;
  if (read_frame(conn, &header, payload) != 1) return 1;
  switch (header.type) {
    case CA_PING:
      return send_frame(conn, CA_PONG, payload, header.length) < 0;
    case CA_EXEC: {
      struct ca_exec exec;
      int status = ca_decode_exec(payload, header.length, &exec);
      if (status != CA_OK) {
        send_error(conn, EPROTO, "bad EXEC: %s", ca_status_text(status));
        return 1;
      }
      int rc = run_exec(conn, &exec);
      free(exec.argv);
      return rc;
    }
    case CA_IDENTITY: {
      struct ca_identity id;
      int status = ca_decode_identity(payload, header.length, &id);
      if (status != CA_OK) {
        send_error(conn, EPROTO, "bad IDENTITY: %s", ca_status_text(status));
        return 1;
      }
      apply_identity(conn, &id);
      return 0;
    }
    default:
      send_error(conn, EPROTO, "frame type %u cannot start a request", header.type);
      return 1;
  }
}

/* The CID this guest's vsock driver holds (a fork's must be its own, not the template's):
 * what the kernel answers, not what the host believes. */
static int print_local_cid(void) {
  int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
  unsigned int cid = 0;
  if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) != 0) {
    logf_("/dev/vsock: IOCTL_VM_SOCKETS_GET_LOCAL_CID: %s", strerror(errno));
    return 1;
  }
  printf("%u\n", cid);
  return 0;
}

int main(int argc, char** argv) {
  unsigned port = CA_PORT;
  int daemonize = 0;
  for (int i = 1; i < argc; ++i) {
    if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      char* end;
      unsigned long value = strtoul(argv[++i], &end, 10);
      if (*end || value == 0 || value > 0xffffffffUL) {
        logf_("bad --port %s", argv[i]);
        return 2;
      }
      port = (unsigned)value;
    } else if (strcmp(argv[i], "--daemon") == 0) {
      daemonize = 1;
    } else if (strcmp(argv[i], "--local-cid") == 0) {
      return print_local_cid();
    } else {
      logf_("usage: clone-agent [--port N] [--daemon] | --local-cid");
      return 2;
    }
  }
  /* Started from a shell script: dispositions it set must not reach the commands. */
  for (int s = 1; s < NSIG; ++s) signal(s, SIG_DFL);
  signal(SIGPIPE, SIG_IGN);

  int listener = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0) {
    logf_("socket(AF_VSOCK): %s", strerror(errno));
    return 1;
  }
  struct sockaddr_vm address = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
  if (bind(listener, (struct sockaddr*)&address, sizeof address) != 0 || listen(listener, 64) != 0) {
    logf_("listen on vsock port %u: %s", port, strerror(errno));
    return 1;
  }
  if (daemonize) {
    pid_t pid = fork();
    if (pid < 0) {
      logf_("fork: %s", strerror(errno));
      return 1;
    }
    if (pid > 0) return 0;
    setsid();
  }
  /* Connection handlers are reaped by the kernel. */
  signal(SIGCHLD, SIG_IGN);
  for (;;) {
    int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) {
      if (errno != EINTR && errno != ECONNABORTED) logf_("accept: %s", strerror(errno));
      continue;
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(listener);
      /* The handler waits for its own command. */
      signal(SIGCHLD, SIG_DFL);
      _exit(serve(conn));
    }
    if (pid < 0) {
      send_error(conn, errno, "fork: %s", strerror(errno));
    }
    close(conn);
  }
}
