// The query core of kv-browser: a read-mostly view of a ckptkv store.
//
// Browser opens a store read-only by default (RocksDB read-only instance, no
// write lock), so it can be used while a training process holds the store
// open for writing; Refresh() reopens it to catch up with new commits. Only
// the maintenance commands open it for writing (Mode::kWrite), which takes
// the store's write lock and fails with Busy while another process has it.
//
// Everything read is verified by the store (FlatBuffers Verifier, record
// checks, chunk digests); nothing read is executed.
#ifndef CKPTKV_TOOLS_KV_BROWSER_BROWSER_CORE_H_
#define CKPTKV_TOOLS_KV_BROWSER_BROWSER_CORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "store/digest.h"
#include "store/status.h"
#include "store/store.h"

namespace ckptkv::kvb {

// One stored tensor of a tag: its file, param path and verified record.
struct TensorEntry {
  std::string file;
  std::string param;
  TensorRecordRef record;

  const fb::TensorRecord& rec() const { return *record.get(); }
  fb::DType dtype() const { return rec().dtype(); }
  std::vector<int64_t> shape() const;
  uint64_t numel() const;
  uint64_t bytes() const { return rec().byte_length(); }
  bool is_inline() const { return rec().inline_data() != nullptr; }
  size_t num_chunks() const;  // 0 for inline tensors
  Digest chunk(size_t i) const;
  uint64_t chunk_offset(size_t i) const { return i * uint64_t{rec().chunk_size()}; }
  uint64_t chunk_length(size_t i) const;
  Digest digest() const;
  // "file:param" for messages.
  std::string where() const { return file + ":" + param; }
};

// Every tensor of one committed tag, ordered by (file, param).
struct TagContents {
  TagInfo info;
  std::vector<TensorEntry> tensors;
};

// A block and the tags that reference it (indices into Browser::Tags()).
struct BlockUse {
  uint64_t length = 0;
  std::vector<uint32_t> tags;  // sorted, unique
};
using BlockMap = std::unordered_map<Digest, BlockUse, DigestHash>;

// Space accounting of one tag against the others.
struct TagSpace {
  uint64_t unique_bytes = 0;  // bytes of blocks only this tag references (+ inline bytes)
  uint64_t shared_bytes = 0;  // bytes of this tag's blocks other tags also reference
  uint64_t blocks = 0;        // distinct blocks referenced
};

class Browser {
 public:
  enum class Mode { kReadOnly, kWrite };
  // Opens an existing store. NotFound / InvalidArgument for a path that is
  // not a store, Busy (kWrite) when another process holds the write lock.
  static Result<std::unique_ptr<Browser>> Open(const std::string& dir, Mode mode);

  // A browser over a store the caller opened (the Python package's Store):
  // its reports read that store; Refresh reopens it, so callers with
  // pending tags use Invalidate instead.
  static std::unique_ptr<Browser> Adopt(std::unique_ptr<Store> store, Mode mode);

  // Reopens the store, seeing commits made since it was opened.
  Status Refresh();
  // Drops the cached tags, contents and block map (after this process
  // committed or deleted through store()).
  void Invalidate() { ClearCaches(); }

  Store& store() { return *store_; }
  const std::string& dir() const { return dir_; }
  Mode mode() const { return mode_; }

  // Committed tags in commit order (cached until Refresh).
  Result<const std::vector<TagInfo>*> Tags();
  // The tag `latest` names, or "".
  Result<std::string> Latest();
  // "latest" and exact names resolve; anything else is NotFound listing the
  // closest tag names.
  Result<std::string> ResolveTag(const std::string& name);
  Result<const TagContents*> Contents(const std::string& tag);
  // The tensor `param` of `tag` (in `file`, or in whichever file holds it).
  // NotFound lists the closest parameter names; ambiguous names list files.
  Result<const TensorEntry*> FindParam(const std::string& tag, const std::string& file,
                                       const std::string& param);
  // Block -> referencing tags, over every committed tag (cached).
  Result<const BlockMap*> Blocks();
  Result<TagSpace> SpaceOf(const std::string& tag);
  // Names of the tags that reference block `d` (via Blocks()).
  std::vector<std::string> TagsOf(const Digest& d);

  // Reads bytes [offset, offset+len) of a tensor, checking chunk digests.
  Status Read(const TensorEntry& e, uint64_t offset, uint64_t len, uint8_t* dst);
  // Raw block bytes read so far.
  uint64_t BlockBytesRead() const { return store_->BlockBytesRead(); }

 private:
  Browser(std::string dir, Mode mode) : dir_(std::move(dir)), mode_(mode) {}
  Status OpenStore();
  void ClearCaches();

  std::string dir_;
  Mode mode_;
  std::unique_ptr<Store> store_;
  std::optional<std::vector<TagInfo>> tags_;
  std::map<std::string, std::unique_ptr<TagContents>> contents_;
  std::optional<BlockMap> blocks_;
};

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_BROWSER_CORE_H_
