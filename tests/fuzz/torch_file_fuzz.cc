// Fuzz target: the readers of torch.save files. The input is run as a
// pickle by the symbolic machine (whatever it makes must be a tree within
// its limits, never a crash), and written to a file read as a zip archive
// (every entry it lists must lie inside the file and read, or fail, cleanly)
// and as a legacy torch.save file (every storage record it finds must lie
// inside the file, after its pickles, and read).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "checkpoint/core/legacy_archive.h"
#include "checkpoint/core/pickle_machine.h"
#include "checkpoint/core/zip_archive.h"

using namespace ckptkv::checkpoint;

namespace {

// Walks the tree, bounded: a memoized list may hold itself.
size_t Walk(const pickle::Value* v, int depth, size_t budget) {
  if (v == nullptr || depth > 64 || budget == 0) return budget;
  --budget;
  for (const auto* c : v->items) budget = Walk(c, depth + 1, budget);
  for (const auto* c : v->appended) budget = Walk(c, depth + 1, budget);
  for (const auto* c : v->set_items) budget = Walk(c, depth + 1, budget);
  return Walk(v->state, depth + 1, budget);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto tree = pickle::Parse(bytes, "fuzz", pickle::Limits::ForSize(size));
  if (tree.ok()) {
    if ((*tree)->root() == nullptr || (*tree)->nodes() > size + 64) std::abort();
    Walk((*tree)->root(), 0, 1u << 16);
  }
  static const std::string path = "/tmp/ckptkv-torch-file-fuzz." + std::to_string(::getpid());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  auto zip = ZipArchive::Open(path);
  if (zip.ok()) {
    for (const auto& e : (*zip)->entries()) {
      if (e.data_offset > size || e.size > size - e.data_offset) {
        if (e.method == 0) std::abort();  // a stored entry must lie inside the file
      }
      (void)(*zip)->Read(e, 1u << 20);
    }
  }
  auto legacy = LegacyArchive::Open(path, 1u << 20);
  if (legacy.ok()) {
    const LegacyArchive& a = **legacy;
    const pickle::Value* root = a.tree().root();
    if (root == nullptr || a.tree().nodes() > a.pickle_size() + 64) std::abort();
    Walk(root, 0, 1u << 16);
    uint64_t end = a.pickle_offset() + a.pickle_size();
    for (const auto& s : a.storages()) {
      // Records follow each other after the pickles, inside the file.
      if (s.data_offset < end + 8 || s.data_offset > size || s.size > size - s.data_offset ||
          s.size != s.numel * s.itemsize || a.Find(s.key) != &s) {
        std::abort();
      }
      end = s.data_offset + s.size;
      uint8_t edge[16];
      const uint64_t n = s.size < sizeof edge ? s.size : sizeof edge;
      if (!a.ReadRange(s, s.size - n, n, edge).ok()) std::abort();
      if (a.ReadRange(s, s.size, 1, edge).ok()) std::abort();
    }
  }
  std::remove(path.c_str());
  return 0;
}
