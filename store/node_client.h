// A rank process's side of the node writer (NodeOptions in store/store.h):
// finds or starts the store's writer, hashes chunks here, sends the ones
// the writer does not have through a sealed shared-memory ring, and reads
// through read-only views of the store that follow its commits. Private
// to store/: Store forwards to it when it was opened through a node writer.
#ifndef CKPTKV_STORE_NODE_CLIENT_H_
#define CKPTKV_STORE_NODE_CLIENT_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "store/status.h"
#include "store/store.h"
#include "store/thread_pool.h"

namespace ckptkv::node {

class Client {
 public:
  // Connects to the writer of `dir`, starting one when there is none.
  static Result<std::unique_ptr<Client>> Connect(const std::string& dir,
                                                 const StoreOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  uint32_t chunk_size() const { return chunk_size_; }
  uint32_t inline_threshold() const { return inline_threshold_; }

  Status Begin(const std::string& tag, const BeginOptions& options);
  bool IsPending(const std::string& tag);
  Result<WriteStats> PutTensor(const std::string& tag, const std::string& file,
                               const std::string& param, const TensorMeta& meta,
                               const ByteSource& bytes);
  Status PutFile(const std::string& tag, const std::string& file, const std::string& tree);
  Status ClearFile(const std::string& tag, const std::string& file);
  void Abort(const std::string& tag);
  Result<TagInfo> Commit(const std::string& tag, const CommitOptions& options);
  Status DeleteTag(const std::string& tag);

  // The read-only view reads go to (kept alive by the caller while used).
  Result<std::shared_ptr<Store>> View();
  // Opens a fresh view (after a commit, or when a tag was not found).
  Status RefreshView();
  // Block bytes read through every view since Connect.
  uint64_t BlockBytesRead();

 private:
  Client(std::string dir, StoreOptions options);
  // Connects (or starts the writer) and says hello; sets up the ring.
  Status Dial();
  Status StartWriter(int dir_fd);
  // One request and its reply; mu_ held.
  Result<std::string> Call(const std::string& frame, const std::string& what);
  Status Lost(const Status& s);
  Status SendBlocks(const std::string& tag, const uint8_t* const* chunks, const uint64_t* lens,
                    const Digest* digests, size_t n, uint32_t group, WriteStats* stats);
  // The reply to the oldest block in flight; frees its slot.
  Status ReapBlock(WriteStats* stats);

  std::string dir_;
  StoreOptions options_;
  std::string peer_;
  uint32_t chunk_size_ = 0;
  uint32_t inline_threshold_ = 0;
  int64_t writer_pid_ = 0;
  std::mutex mu_;  // one exchange with the writer at a time
  int sock_ = -1;
  bool broken_ = false;  // the connection failed; the next Begin reconnects
  uint8_t* ring_ = nullptr;
  size_t ring_bytes_ = 0;
  uint32_t slots_ = 0;
  std::vector<uint32_t> free_slots_;
  std::vector<char> busy_;  // per slot: a block in it awaits its reply
  size_t InFlight() const { return slots_ - free_slots_.size(); }
  std::unique_ptr<ThreadPool> pool_;
  std::mutex view_mu_;
  std::shared_ptr<Store> view_;
  uint64_t bytes_read_before_ = 0;  // by the views replaced
};

}  // namespace ckptkv::node

#endif  // CKPTKV_STORE_NODE_CLIENT_H_
