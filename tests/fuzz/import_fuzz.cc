// Fuzz target: `ckptkv import` of a torch.save file whose data.pkl is the
// input. The input is packed into a zip beside one 64-byte storage entry
// ("0": 16 float32, the seed corpus's tensors use it) and imported into a
// pending tag of a scratch store, then the tag is aborted; an input that
// starts as a legacy torch.save file (its pickled magic number) is imported
// as that file itself. Whatever the pickle holds, the import succeeds or
// fails with a Status: never a crash, a hang or a call of what the pickle
// names.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/core/legacy_archive.h"
#include "checkpoint/core/zip_archive.h"
#include "checkpoint/query/placer.h"
#include "checkpoint/query/torch_import.h"
#include "store/store.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;

namespace {

void Put(std::string* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// A zip of stored entries, as torch.save writes them.
std::string Zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out, central;
  for (const auto& [name, data] : entries) {
    const uint32_t crc = Crc32(reinterpret_cast<const uint8_t*>(data.data()), data.size());
    const uint64_t local = out.size();
    Put(&out, 0x04034b50, 4);
    Put(&out, 20, 2);
    Put(&out, 0, 2);
    Put(&out, 0, 2);
    Put(&out, 0, 4);
    Put(&out, crc, 4);
    Put(&out, data.size(), 4);
    Put(&out, data.size(), 4);
    Put(&out, name.size(), 2);
    Put(&out, 0, 2);
    out += name + data;
    Put(&central, 0x02014b50, 4);
    Put(&central, 20, 2);
    Put(&central, 20, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 4);
    Put(&central, crc, 4);
    Put(&central, data.size(), 4);
    Put(&central, data.size(), 4);
    Put(&central, name.size(), 2);
    Put(&central, 0, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 2);
    Put(&central, 0, 4);
    Put(&central, local, 4);
    central += name;
  }
  const uint64_t cd_offset = out.size();
  out += central;
  Put(&out, 0x06054b50, 4);
  Put(&out, 0, 2);
  Put(&out, 0, 2);
  Put(&out, entries.size(), 2);
  Put(&out, entries.size(), 2);
  Put(&out, central.size(), 4);
  Put(&out, cd_offset, 4);
  Put(&out, 0, 2);
  return out;
}

struct Scratch {
  Scratch() {
    char tmpl[] = "/tmp/ckptkv-import-fuzz-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) std::abort();
    dir = tmpl;
    StoreOptions o;
    o.threads = 1;
    store = ValueOrThrow(Store::Open(dir + "/store", o));
  }
  ~Scratch() {
    store.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::string dir;
  std::unique_ptr<Store> store;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Scratch scratch;
  const std::string pkl(reinterpret_cast<const char*>(data), size);
  std::string storage(64, '\0');
  for (int i = 0; i < 16; ++i) {
    const float f = static_cast<float>(i);
    std::memcpy(storage.data() + 4 * i, &f, 4);
  }
  const std::string file = scratch.dir + "/f.pt";
  {
    FILE* f = std::fopen(file.c_str(), "wb");
    if (f == nullptr) return 0;
    const std::string bytes =
        LegacyArchive::LooksLegacy(pkl)
            ? pkl
            : Zip({{"f/data.pkl", pkl}, {"f/data/0", storage}, {"f/version", "3\n"}});
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  if (!scratch.store->BeginTag("t", /*overwrite=*/true).ok()) std::abort();
  DeepSpeedPlacer placer;
  (void)ImportTorchFile(*scratch.store, "t", "mp_rank_00_model_states.pt", file, &placer);
  scratch.store->AbortTag("t");
  placer.EndTag("t");
  return 0;
}
