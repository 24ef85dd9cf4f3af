#pragma once
// An open directory sent with a VM API call (vm_control.capnp's Directory, Cap'n Proto fd
// passing): `clone snapshot` sends its output directory this way. The fd is borrowed and must
// stay open until the call has returned.

#include "vm_control.capnp.h"

namespace clonevm::rpc {

class DirectoryFd final : public Directory::Server {
 public:
  explicit DirectoryFd(int fd) : fd_(fd) {}
  kj::Maybe<int> getFd() override { return fd_; }

 private:
  int fd_;
};

}  // namespace clonevm::rpc
