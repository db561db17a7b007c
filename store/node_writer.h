// The node writer: the one process that writes a store on behalf of the
// rank processes of a job (NodeOptions in store/store.h). The `ckptkvd`
// program (tools/ckptkvd_main.cc) runs ServeNode over a store it opened for
// writing; docs/architecture.md ("One store per node") has the protocol
// and its crash semantics.
#ifndef CKPTKV_STORE_NODE_WRITER_H_
#define CKPTKV_STORE_NODE_WRITER_H_

#include <functional>
#include <string>

#include "store/status.h"
#include "store/store.h"

namespace ckptkv::node {

struct WriterOptions {
  // Exit this long after the last client has gone (and no tag is pending).
  double idle_exit_s = 2;
  // Runs after the commit of a tag whose ranks asked for placements
  // (BeginOptions::place_after_commit), before the ranks' commits return.
  // An error is logged; the commit stands.
  std::function<Status(Store&, const std::string& tag)> place_after_commit;
  // Called once the socket listens (ready = OK) or when serving cannot
  // start (the error); ckptkvd tells the process that started it.
  std::function<void(const Status&)> on_ready;
  // Called when serving ends, under the start lock, after the socket is
  // gone and every client thread has ended; ckptkvd closes the store here,
  // so that a writer started next never finds it still locked. The store
  // is not used after it.
  std::function<void()> on_exit;
};

// Serves `store` (open for writing, so this process holds its lock) at
// the socket in its directory until the last client has gone and
// idle_exit_s has passed; then removes the socket and returns OK. Errors:
// the socket cannot be made.
Status ServeNode(Store& store, const WriterOptions& options);

}  // namespace ckptkv::node

#endif  // CKPTKV_STORE_NODE_WRITER_H_
