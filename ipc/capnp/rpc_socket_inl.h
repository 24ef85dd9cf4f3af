#pragma once

#include "common/error.h"

namespace clonevm::rpc {

template <typename Body>
auto rethrowKj(const std::string& what, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const kj::Exception& exception) {
    throw Error(what + ": " + describeKjException(exception));
  }
}

}  // namespace clonevm::rpc
