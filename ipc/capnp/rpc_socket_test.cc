// The API socket plumbing: a listener bound by one process and served from its fd, and an
// open directory travelling with a call (Cap'n Proto fd passing), as `clone snapshot` sends
// one to a jailed core.

#include "ipc/capnp/rpc_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <capnp/rpc-twoparty.h>
#include <gtest/gtest.h>

#include "common/error.h"
#include "ipc/capnp/directory_fd.h"
#include "vm_control.capnp.h"

namespace clonevm::rpc {
namespace {

namespace fs = std::filesystem;

// Answers snapshot() by creating a file in the directory the call carried, as the core does.
class DirectoryWriter final : public VmControl::Server {
 public:
  bool sawFd = false;

 protected:
  kj::Promise<void> snapshot(SnapshotContext context) override {
    auto directory = context.getParams().getDirectory();
    return directory.getFd().then([this, directory](kj::Maybe<int> fd) mutable {
      KJ_IF_MAYBE(dirFd, fd) {
        sawFd = true;
        UniqueFd file(::openat(*dirFd, "written-through-the-fd", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444));
        KJ_REQUIRE(file.get() >= 0, "openat in the received directory failed");
      }
    });
  }
};

class RpcSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / ("rpc-socket-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    socket_ = (dir_ / "api.sock").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
  std::string socket_;
};

TEST_F(RpcSocketTest, AnInheritedListenerServesAndADirectoryFdTravelsWithACall) {
  auto io = kj::setupAsyncIo();
  // Bound as the CLI does, then served from the fd alone, as the core does.
  UniqueFd bound = bindUnixListener(socket_);
  auto listener = listenOnFd(io, std::move(bound), "test API socket");
  auto writer = kj::heap<DirectoryWriter>();
  DirectoryWriter& server = *writer;
  capnp::TwoPartyServer twoParty(kj::mv(writer));
  auto serving = twoParty.listenCapStreamReceiver(*listener, kMaxFdsPerMessage);

  fs::create_directories(dir_ / "out");
  UniqueFd out(::open((dir_ / "out").c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  ASSERT_TRUE(out);
  auto connection = connectUnix(io, socket_);
  capnp::TwoPartyClient client(*connection, kMaxFdsPerMessage);
  auto vm = client.bootstrap().castAs<VmControl>();
  auto request = vm.snapshotRequest();
  request.setOutputDir("out");
  request.setDirectory(kj::heap<DirectoryFd>(out.get()));
  request.send().wait(io.waitScope);
  EXPECT_TRUE(server.sawFd);
  EXPECT_TRUE(fs::exists(dir_ / "out" / "written-through-the-fd"));

  // A call without a directory carries no fd.
  server.sawFd = false;
  vm.snapshotRequest().send().wait(io.waitScope);
  EXPECT_FALSE(server.sawFd);
}

TEST_F(RpcSocketTest, ALiveSocketIsRefusedAndAStaleOneReplaced) {
  UniqueFd live = bindUnixListener(socket_);
  EXPECT_TRUE(someoneListens(socket_));
  try {
    bindUnixListener(socket_);
    ADD_FAILURE() << "a second listener on a live socket";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("in use by another process"), std::string::npos) << e.what();
  }
  live = UniqueFd();  // its process ended: the file stays, nobody listens
  EXPECT_TRUE(fs::exists(socket_));
  EXPECT_FALSE(someoneListens(socket_));
  UniqueFd again = bindUnixListener(socket_);
  EXPECT_TRUE(someoneListens(socket_));
  struct stat info {};
  ASSERT_EQ(::stat(socket_.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0077, 0u) << "only its owner may connect";

  { std::ofstream(dir_ / "plain") << "not a socket"; }
  EXPECT_THROW(bindUnixListener((dir_ / "plain").string()), Error);
  EXPECT_FALSE(someoneListens((dir_ / "missing.sock").string()));
}

TEST_F(RpcSocketTest, AnFdThatIsNotAListeningUnixSocketIsRefused) {
  auto io = kj::setupAsyncIo();
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  UniqueFd other(pair[1]);
  EXPECT_THROW(listenOnFd(io, UniqueFd(pair[0]), "a connected socket"), Error);
  EXPECT_THROW(listenOnFd(io, UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)), "/dev/null"),
               Error);
  try {
    listenOnFd(io, UniqueFd(), "--api-fd 99");
    ADD_FAILURE() << "an invalid fd was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a listening unix socket"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace clonevm::rpc
