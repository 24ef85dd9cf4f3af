@0xea737922474b98ab;
# Device control: the core (or the CLI) talks to a device process with it, beside the
# vhost-user data plane. A device's channel cannot ask for memory changes: the core owns guest
# memory, and this interface only lets it configure, watch and ask a device for state.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("clonevm::rpc");

struct Stat {
  name @0 :Text;
  value @1 :UInt64;
}

struct Health {
  healthy @0 :Bool;
  detail @1 :Text;
}

interface DeviceControl {
  # A device-specific configuration document (JSON), validated by the device.
  configure @0 (config :Text) -> ();
  health @1 () -> (health :Health);
  stats @2 () -> (stats :List(Stat));
  # Hands the device a connected vhost-user socket (the fd travels with the message).
  attachVhostUser @3 (socket :Fd) -> ();
}

# A file descriptor passed alongside the message (Cap'n Proto's fd passing on unix sockets).
interface Fd {}
