#include "jailer/jail_config.h"

#include <pwd.h>
#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <iterator>

#include <CLI/CLI.hpp>

#include "common/error.h"

namespace clonevm::jailer {
namespace {

constexpr size_t kMaxIdLength = 64;

uint64_t parseNumber(const std::string& text, const char* what) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  require(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
          "{} '{}' is not a number", what, text);
  return value;
}

// A numeric id, or a user/group name looked up in the host's passwd/group.
uint32_t parseId(const std::string& text, bool isUser) {
  const char* what = isUser ? "--uid" : "--gid";
  require(!text.empty(), "{} is empty", what);
  if (text.find_first_not_of("0123456789") == std::string::npos) {
    uint64_t value = parseNumber(text, what);
    // (uid_t)-1 means "unchanged" to setresuid: never a real id.
    require(value < 0xffffffffu, "{} {} is out of range", what, text);
    return static_cast<uint32_t>(value);
  }
  if (isUser) {
    const passwd* entry = ::getpwnam(text.c_str());
    require(entry != nullptr, "--uid '{}': no such user", text);
    return entry->pw_uid;
  }
  const group* entry = ::getgrnam(text.c_str());
  require(entry != nullptr, "--gid '{}': no such group", text);
  return entry->gr_gid;
}

void requireAbsolute(const std::string& path, const char* flag) {
  require(!path.empty() && path[0] == '/', "{} '{}' must be an absolute path", flag, path);
  require(path.find("/../") == std::string::npos && !path.ends_with("/.."),
          "{} '{}' must not contain '..'", flag, path);
}

}  // namespace

JailConfig parseJailerArgs(const std::vector<std::string>& args) {
  JailConfig config;
  CLI::App app{"clone-jailer: run one process of a VM in its own jail (docs/JAILER.md)",
               "clone-jailer"};
  std::string uid;
  std::string gid;
  std::string userns = "auto";
  std::vector<std::string> rlimits;
  app.add_option("--id", config.id, "unique name of this jail: [A-Za-z0-9_.-], at most 64")
      ->required();
  app.add_option("--exec-file", config.execFile, "absolute path of the program")->required();
  app.add_option("--uid", uid, "user to run as (number or name)")->required();
  app.add_option("--gid", gid, "group to run as (number or name)")->required();
  app.add_option("--cgroup", config.cgroupLimits,
                 "FILE=VALUE written in the jail's cgroup: memory.max=, cpu.max=, pids.max=; "
                 "repeatable");
  app.add_option("--cgroup-parent", config.cgroupParent,
                 "cgroup v2 directory the jail's cgroup is created in (default: "
                 "<cgroup2 mount>/clone)");
  app.add_option("--ro", config.readPaths, "path visible read-only in the jail; repeatable");
  app.add_option("--rw", config.writePaths, "path visible read-write in the jail; repeatable");
  app.add_option("--dev", config.devices, "device node to bind in the jail (/dev/kvm); repeatable");
  app.add_option("--keep-fd", config.keepFds, "inherited fd to keep open; repeatable");
  app.add_flag("--net", config.network, "keep the host's network namespace");
  app.add_option("--userns", userns, "auto|on|off: a user namespace (auto: unless root)")
      ->capture_default_str();
  app.add_option("--rlimit", rlimits, "nofile=N, nproc=N, fsize=N; repeatable");
  app.footer("Everything after -- is passed to the program.");
  auto separator = std::find(args.begin(), args.end(), "--");
  if (separator != args.end()) config.args.assign(separator + 1, args.end());
  std::vector<std::string> reversed(std::make_reverse_iterator(separator), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    throw HelpRequested{app.help()};
  } catch (const CLI::ParseError& error) {
    throw Error(error.what());
  }
  config.uid = parseId(uid, true);
  config.gid = parseId(gid, false);
  if (userns == "auto") {
    config.userNamespace = UserNamespace::kAuto;
  } else if (userns == "on") {
    config.userNamespace = UserNamespace::kOn;
  } else if (userns == "off") {
    config.userNamespace = UserNamespace::kOff;
  } else {
    throw Error(fmt::format("--userns '{}' must be auto, on or off", userns));
  }
  for (const auto& limit : rlimits) {
    auto eq = limit.find('=');
    require(eq != std::string::npos, "--rlimit '{}' must be NAME=VALUE", limit);
    std::string name = limit.substr(0, eq);
    uint64_t value = parseNumber(limit.substr(eq + 1), "--rlimit value");
    if (name == "nofile") {
      config.rlimitNofile = value;
    } else if (name == "nproc") {
      config.rlimitNproc = value;
    } else if (name == "fsize") {
      config.rlimitFsize = value;
    } else {
      throw Error(fmt::format("--rlimit '{}': unknown limit (nofile, nproc, fsize)", name));
    }
  }
  validate(config);
  return config;
}

void validate(const JailConfig& config) {
  require(!config.id.empty(), "--id is empty");
  require(config.id.size() <= kMaxIdLength, "--id '{}' is longer than {} characters", config.id,
          kMaxIdLength);
  require(config.id != "." && config.id != ".." && config.id.find("..") == std::string::npos,
          "--id '{}' must not contain '..'", config.id);
  require(config.id.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                      "0123456789_.-") == std::string::npos,
          "--id '{}' may hold only letters, digits, '_', '.', '-' (no '/')", config.id);
  requireAbsolute(config.execFile, "--exec-file");
  struct stat st {};
  if (::stat(config.execFile.c_str(), &st) != 0) {
    throwSystemError(errno, "--exec-file", config.execFile);
  }
  require(S_ISREG(st.st_mode), "--exec-file '{}' is not a regular file", config.execFile);
  require((st.st_mode & 0111) != 0, "--exec-file '{}' is not executable", config.execFile);
  require(config.uid != static_cast<uid_t>(-1), "--uid is out of range");
  require(config.gid != static_cast<gid_t>(-1), "--gid is out of range");
  for (const auto& path : config.readPaths) requireAbsolute(path, "--ro");
  for (const auto& path : config.writePaths) requireAbsolute(path, "--rw");
  for (const auto& path : config.devices) {
    requireAbsolute(path, "--dev");
    require(path.starts_with("/dev/"), "--dev '{}' is not under /dev", path);
  }
  for (int fd : config.keepFds) require(fd >= 0, "--keep-fd {} is negative", fd);
  for (const auto& limit : config.cgroupLimits) {
    auto eq = limit.find('=');
    require(eq != std::string::npos && eq > 0, "--cgroup '{}' must be FILE=VALUE", limit);
    std::string file = limit.substr(0, eq);
    require(file.find('/') == std::string::npos && file.find('.') != std::string::npos &&
                !file.starts_with("cgroup."),
            "--cgroup '{}': not a controller file like memory.max", limit);
  }
  if (!config.cgroupParent.empty()) requireAbsolute(config.cgroupParent, "--cgroup-parent");
  require(config.rlimitNofile >= 16, "--rlimit nofile={} is too small", config.rlimitNofile);
}

std::vector<std::string> toJailerArgs(const JailConfig& config) {
  std::vector<std::string> args{"--id", config.id, "--exec-file", config.execFile, "--uid",
                                std::to_string(config.uid), "--gid", std::to_string(config.gid)};
  for (const auto& limit : config.cgroupLimits) args.insert(args.end(), {"--cgroup", limit});
  if (!config.cgroupParent.empty()) args.insert(args.end(), {"--cgroup-parent", config.cgroupParent});
  for (const auto& path : config.readPaths) args.insert(args.end(), {"--ro", path});
  for (const auto& path : config.writePaths) args.insert(args.end(), {"--rw", path});
  for (const auto& path : config.devices) args.insert(args.end(), {"--dev", path});
  for (int fd : config.keepFds) args.insert(args.end(), {"--keep-fd", std::to_string(fd)});
  if (config.network) args.push_back("--net");
  const char* userns = config.userNamespace == UserNamespace::kOn    ? "on"
                       : config.userNamespace == UserNamespace::kOff ? "off"
                                                                     : "auto";
  args.insert(args.end(), {"--userns", userns});
  args.insert(args.end(), {"--rlimit", "nofile=" + std::to_string(config.rlimitNofile)});
  args.insert(args.end(), {"--rlimit", "nproc=" + std::to_string(config.rlimitNproc)});
  if (config.rlimitFsize) {
    args.insert(args.end(), {"--rlimit", "fsize=" + std::to_string(*config.rlimitFsize)});
  }
  args.push_back("--");
  args.insert(args.end(), config.args.begin(), config.args.end());
  return args;
}

}  // namespace clonevm::jailer
