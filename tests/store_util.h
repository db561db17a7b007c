// Store helpers shared by the store tests and the fuzz targets.
#ifndef CKPTKV_TESTS_STORE_UTIL_H_
#define CKPTKV_TESTS_STORE_UTIL_H_

#include <sys/types.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "store/store.h"

namespace ckptkv::testing {

// A state tree of one None node: a file's tree when only its tensors matter.
inline std::string EmptyTree() {
  flatbuffers::FlatBufferBuilder b;
  fb::NodeBuilder nb(b);
  nb.add_kind(fb::NodeKind::None);
  auto root = nb.Finish();
  b.Finish(fb::CreateStateTree(b, root));
  return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
}

// Saves `bytes` as a 1-D uint8 tensor `param` of `tag`/`file`.
inline Result<WriteStats> PutBytes(Store& s, const std::string& tag, const std::string& file,
                                   const std::string& param, const std::vector<uint8_t>& bytes) {
  TensorMeta meta;
  meta.dtype = fb::DType::UInt8;
  meta.shape = {static_cast<int64_t>(bytes.size())};
  ByteSource src;
  src.length = bytes.size();
  src.data = bytes.data();
  return s.PutTensor(tag, file, param, meta, src);
}

// Forks a child that opens the store at `dir` for writing and holds it
// until it is killed. Returns the child's pid once the store is open, or -1
// if the child could not open it. The child makes no RocksDB background
// calls, so it is safe to fork from a process that used RocksDB.
inline pid_t HoldStoreInChild(const std::string& dir, const StoreOptions& options) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    auto held = Store::Open(dir, options);
    char c = held.ok() ? 'y' : 'n';
    (void)!::write(ready[1], &c, 1);
    ::pause();
    ::_exit(0);
  }
  ::close(ready[1]);
  char c = 0;
  const bool ok = pid > 0 && ::read(ready[0], &c, 1) == 1 && c == 'y';
  ::close(ready[0]);
  return ok ? pid : -1;
}

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_STORE_UTIL_H_
