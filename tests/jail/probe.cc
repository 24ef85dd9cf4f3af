// jail-probe: a tiny program run inside clone-jailer by the jail tests. It lists its root, locks
// itself down with one seccomp policy like a real Clone process, prints "ready" and then tries
// what the test asks on stdin, one word a line, printing "WORD: ok" or "WORD: errno N".
// A seccomp kill ends it with SIGSYS before it can answer.
//
//   jail-probe KIND MODE      KIND: vmm|block|net|fs|vfio; MODE: kill|log|off
#include <dirent.h>
#include <fcntl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "jailer/seccomp/seccomp_policy.h"

namespace {

void say(const std::string& text) {
  std::string line = text + "\n";
  (void)!::write(1, line.data(), line.size());
}

void report(const char* what, long rc) {
  say(std::string(what) + (rc >= 0 ? ": ok" : ": errno " + std::to_string(errno)));
}

std::string listDir(const char* path) {
  std::string names;
  DIR* dir = ::opendir(path);
  if (dir == nullptr) return std::string("<") + std::strerror(errno) + ">";
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names += " " + name;
  }
  ::closedir(dir);
  return names;
}

bool readLine(std::string& line) {
  line.clear();
  char c = 0;
  while (::read(0, &c, 1) == 1) {
    if (c == '\n') return true;
    line += c;
  }
  return !line.empty();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: jail-probe KIND kill|log|off\n");
    return 2;
  }
  say("root:" + listDir("/"));
  say("dev:" + listDir("/dev"));
  try {
    clonevm::seccomp::install(clonevm::seccomp::parseKind(argv[1]),
                              clonevm::seccomp::parseMode(argv[2]));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "jail-probe: %s\n", error.what());
    return 1;
  }
  say("ready");
  std::string command;
  while (readLine(command)) {
    if (command == "ptrace") {
      report("ptrace", ::ptrace(PTRACE_TRACEME, 0, nullptr, nullptr));
    } else if (command == "shadow") {
      report("shadow", ::open("/etc/shadow", O_RDONLY | O_CLOEXEC));
    } else if (command == "inet") {
      report("inet", ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    } else if (command == "unix") {
      report("unix", ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    } else if (command == "exec") {
      char* args[] = {const_cast<char*>("/bin/true"), nullptr};
      report("exec", ::execve("/bin/true", args, args + 1));
    } else if (command == "exit") {
      return 0;
    } else {
      say(command + ": unknown");
    }
  }
  return 0;
}
