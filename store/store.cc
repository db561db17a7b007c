// Store and Store::Impl lifetime, the accessors, and the helpers every
// store_*.cc file uses (store_internal.h lists which file holds what).
#include "store/store.h"

#include <chrono>
#include <filesystem>

#include "store/node_client.h"
#include "store/store_internal.h"

namespace ckptkv {

namespace fs = std::filesystem;

namespace {

uint64_t DirBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    std::error_code ec2;
    if (it->is_regular_file(ec2)) total += it->file_size(ec2);
  }
  return total;
}

}  // namespace

Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return Status::OK();
  if (s.IsNotFound()) return Status::NotFound(what + ": " + s.ToString());
  if (s.IsCorruption()) return Status::Corruption(what + ": " + s.ToString());
  if (s.IsInvalidArgument()) return Status::InvalidArgument(what + ": " + s.ToString());
  return Status::IOError(what + ": " + s.ToString());
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string JoinNames(const std::vector<std::string>& names, size_t max) {
  if (names.empty()) return "(none)";
  std::string out;
  for (size_t i = 0; i < names.size() && i < max; ++i) {
    if (i) out += ", ";
    out += names[i];
  }
  if (names.size() > max) out += ", ... (" + std::to_string(names.size()) + " in all)";
  return out;
}

void WriteStats::Add(const WriteStats& o) {
  logical_bytes += o.logical_bytes;
  chunks += o.chunks;
  new_blocks += o.new_blocks;
  new_bytes += o.new_bytes;
  stored_new_bytes += o.stored_new_bytes;
}

Store::Impl::~Impl() {
  if (db_) {
    for (auto* h : owned_handles_) db_->DestroyColumnFamilyHandle(h);
    db_->Close();
    db_.reset();
  }
}

Status Store::Impl::WritableCheck(const char* op) const {
  if (options_.read_only) {
    return Status::FailedPrecondition(std::string(op) + " needs a writable store; '" + dir_ +
                                      "' was opened read-only");
  }
  return Status::OK();
}

Result<std::unique_ptr<Store>> Store::Impl::FreshView() const {
  StoreOptions o = options_;
  o.create_if_missing = false;
  o.read_only = true;
  return Store::Open(dir_, o);
}

std::unique_ptr<ReadBuffers> BufferPool::Take() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::make_unique<ReadBuffers>();
  auto b = std::move(free_.back());
  free_.pop_back();
  return b;
}

void BufferPool::Give(std::unique_ptr<ReadBuffers> b) {
  b->value.Reset();
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(std::move(b));
}

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

const std::string& Store::dir() const { return impl_->dir_; }
uint32_t Store::chunk_size() const { return impl_->chunk_size_; }
uint32_t Store::inline_threshold() const { return impl_->inline_threshold_; }
bool Store::read_only() const { return impl_->options_.read_only; }
bool Store::through_node_writer() const { return impl_->node_ != nullptr; }
uint64_t Store::DiskBytes() const { return DirBytes(impl_->dir_); }
uint64_t Store::BlockBytesRead() const {
  if (impl_->node_) return impl_->node_->BlockBytesRead();
  return impl_->block_bytes_read_.load();
}

}  // namespace ckptkv
