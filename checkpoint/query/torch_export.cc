#include "checkpoint/query/torch_export.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "checkpoint/core/pickle_machine.h"
#include "checkpoint/core/pickle_writer.h"
#include "checkpoint/core/zip_archive.h"
#include "checkpoint/core/zip_writer.h"
#include "checkpoint/query/reshape.h"
#include "schema/records.h"
#include "store/digest.h"
#include "store/record_check.h"

namespace ckptkv::checkpoint {

namespace {

constexpr uint64_t kWindow = 16u << 20;           // bytes of a tensor read and written at a time
constexpr uint64_t kMaxInlineArray = 1ull << 30;  // numpy array bytes written into a pickle
constexpr const char* kArchive = "archive";

// One file to write: `file` of `store_tag` as `rel` below the directory.
struct Job {
  std::string store_tag, file, rel;
  std::string text;  // a text file (latest) instead, when file is empty
};

struct Storage {
  std::string param, key, location;
  TensorRecordRef record;
};

class Exporter {
 public:
  Exporter(Store& store, const TorchExportOptions& o, ExportDir* dir)
      : store_(store), o_(o), dir_(dir) {}

  Status Cancelled() const {
    if (o_.cancel != nullptr && o_.cancel->load()) {
      return Status::FailedPrecondition("export interrupted; the files written were removed");
    }
    return Status::OK();
  }

  void Progress(uint64_t n) {
    done_ += n;
    if (o_.progress) o_.progress(done_, total_);
  }

  uint64_t total_ = 0;

  // Writes and checks one torch file; its temporary file is returned.
  Result<std::unique_ptr<TempFile>> WriteTorchFile(const Job& job, ExportedFile* out) {
    const std::string where = "tag '" + job.store_tag + "' file '" + job.file + "'";
    ASSIGN_OR_RETURN(std::string tree_bytes, store_.GetFileTree(job.store_tag, job.file));
    const fb::StateTree* tree = VerifiedStateTree(tree_bytes);
    if (tree == nullptr) return Status::Corruption(where + ": the state tree does not verify");
    std::vector<Storage> storages;
    pickle::PickleHooks hooks;
    hooks.tensor = [&](const std::string& param,
                       const std::string& device) -> Result<pickle::PickledTensor> {
      ASSIGN_OR_RETURN(TensorRecordRef rec, store_.GetTensorRecord(job.store_tag, job.file, param));
      pickle::PickledTensor t;
      t.key = std::to_string(storages.size());
      t.dtype = rec->dtype();
      if (rec->shape()) t.shape.assign(rec->shape()->begin(), rec->shape()->end());
      t.requires_grad = rec->requires_grad();
      t.location = device.empty() ? "cpu" : device;
      storages.push_back({param, t.key, t.location, std::move(rec)});
      return t;
    };
    hooks.tensor_bytes = [&](const std::string& param) -> Result<std::string> {
      ASSIGN_OR_RETURN(TensorRecordRef rec, store_.GetTensorRecord(job.store_tag, job.file, param));
      if (rec->byte_length() > kMaxInlineArray) {
        return Status::NotSupported(where + ": numpy array '" + param + "' holds " +
                                    std::to_string(rec->byte_length()) +
                                    " bytes; at most 1 GiB is written inside a pickle");
      }
      std::string bytes(rec->byte_length(), '\0');
      RETURN_IF_ERROR(store_.ReadTensor(*rec.get(), reinterpret_cast<uint8_t*>(bytes.data()),
                                        bytes.size(), where + ":" + param));
      return bytes;
    };
    ASSIGN_OR_RETURN(std::string pkl,
                     pickle::PickleStateTree(tree->root(), hooks, where,
                                             StateTreeNodeBudget(tree_bytes.size())));

    ASSIGN_OR_RETURN(std::unique_ptr<TempFile> f, dir_->Create(job.rel));
    ZipWriter zip(f.get());
    const std::string prefix = std::string(kArchive) + "/";
    RETURN_IF_ERROR(zip.Add(prefix + "data.pkl", pkl));
    std::vector<uint8_t> buf;
    for (const Storage& s : storages) {
      const uint64_t len = s.record->byte_length();
      RETURN_IF_ERROR(zip.Begin(prefix + "data/" + s.key, len));
      buf.resize(std::min(len, kWindow));
      for (uint64_t off = 0; off < len; off += kWindow) {
        RETURN_IF_ERROR(Cancelled());
        const uint64_t n = std::min(kWindow, len - off);
        TensorRead r;
        r.record = s.record.get();
        r.offset = off;
        r.length = n;
        r.dst = buf.data();
        r.where = where + ":" + s.param;
        RETURN_IF_ERROR(store_.ReadTensors({r}));
        RETURN_IF_ERROR(zip.Append(buf.data(), n));
        Progress(n);
      }
      RETURN_IF_ERROR(zip.End());
      out->bytes += len;
    }
    RETURN_IF_ERROR(zip.Add(prefix + "version", "3\n"));
    RETURN_IF_ERROR(zip.Add(prefix + "byteorder", "little"));
    RETURN_IF_ERROR(zip.Finish());
    RETURN_IF_ERROR(f->SyncAndClose());
    Status checked = Check(f->temp_path(), job.rel, pkl, storages);
    if (!checked.ok()) return checked.WithContext("re-reading the written '" + job.rel + "'");
    out->path = job.rel;
    out->tensors = storages.size();
    written_ += f->size();
    return f;
  }

  // The written file, re-read as torch.load would read it: a zip whose
  // entries are exactly those written, its pickle parsed by the project's
  // pickle machine with every storage it names (class, key, numel) one of
  // those written, and every storage's bytes matching the stored chunk
  // digests and the entry's CRC-32.
  Status Check(const std::string& path, const std::string& rel, const std::string& pkl,
               const std::vector<Storage>& storages) {
    ASSIGN_OR_RETURN(std::unique_ptr<ZipArchive> zip, ZipArchive::Open(path));
    if (zip->entries().size() != storages.size() + 3) {
      return Status::Corruption("it holds " + std::to_string(zip->entries().size()) +
                                " zip entries; " + std::to_string(storages.size() + 3) +
                                " were written");
    }
    const std::string prefix = std::string(kArchive) + "/";
    const ZipEntry* data_pkl = zip->Find(prefix + "data.pkl");
    if (data_pkl == nullptr) return Status::Corruption("data.pkl is missing");
    ASSIGN_OR_RETURN(std::string got, zip->Read(*data_pkl, pkl.size()));
    if (got != pkl) return Status::Corruption("data.pkl differs from the pickle written");
    uint64_t consumed = 0;
    ASSIGN_OR_RETURN(std::unique_ptr<pickle::Tree> parsed,
                     pickle::Parse(got, rel, pickle::Limits::ForSize(got.size()), &consumed));
    if (consumed != got.size()) return Status::Corruption("data.pkl has bytes after its STOP");
    std::map<std::string, const Storage*> by_key;
    for (const Storage& s : storages) by_key[s.key] = &s;
    std::set<std::string> named;
    std::set<const pickle::Value*> seen;
    std::vector<const pickle::Value*> todo{parsed->root()};
    while (!todo.empty()) {
      const pickle::Value* v = todo.back();
      todo.pop_back();
      if (v == nullptr || !seen.insert(v).second) continue;
      if (v->kind == pickle::Kind::kPersistentId) {
        const pickle::Value* pid = v->items.empty() ? nullptr : v->items[0];
        if (pid == nullptr || pid->kind != pickle::Kind::kTuple || pid->items.size() != 5 ||
            pid->items[0]->text != "storage" || pid->items[2]->kind != pickle::Kind::kString) {
          return Status::Corruption("data.pkl holds a persistent id that is not a storage");
        }
        auto it = by_key.find(pid->items[2]->text);
        if (it == by_key.end()) {
          return Status::Corruption("data.pkl names storage '" + pid->items[2]->text +
                                    "', which was not written");
        }
        const Storage& s = *it->second;
        const uint64_t es = DTypeSize(s.record->dtype());
        if (pickle::QualifiedName(pid->items[1]) !=
                std::string("torch.") + pickle::StorageClass(s.record->dtype()) ||
            pid->items[3]->text != s.location || pid->items[4]->kind != pickle::Kind::kInt ||
            es == 0 || static_cast<uint64_t>(pid->items[4]->i) * es != s.record->byte_length()) {
          return Status::Corruption("data.pkl's storage '" + s.key + "' of '" + s.param +
                                    "' differs from the tensor written");
        }
        named.insert(s.key);
      }
      for (const pickle::Value* c : v->items) todo.push_back(c);
      for (const pickle::Value* c : v->appended) todo.push_back(c);
      for (const pickle::Value* c : v->set_items) todo.push_back(c);
      todo.push_back(v->state);
    }
    if (named.size() != storages.size()) {
      return Status::Corruption("data.pkl names " + std::to_string(named.size()) + " of the " +
                                std::to_string(storages.size()) + " storages written");
    }
    for (const char* name : {"version", "byteorder"}) {
      if (zip->Find(prefix + name) == nullptr)
        return Status::Corruption(std::string(name) + " is missing");
    }
    std::vector<uint8_t> buf;
    for (const Storage& s : storages) {
      const ZipEntry* e = zip->Find(prefix + "data/" + s.key);
      const fb::TensorRecord& r = *s.record.get();
      const std::string what = "storage " + s.key + " (tensor '" + s.param + "')";
      if (e == nullptr) return Status::Corruption(what + " is missing");
      if (e->size != r.byte_length()) return Status::Corruption(what + " has the wrong size");
      if (e->data_offset % 64 != 0) return Status::Corruption(what + " is not 64-byte aligned");
      uint32_t crc = 0;
      auto check = [&](uint64_t off, uint64_t n, const Digest& want, const std::string& part) {
        buf.resize(n);
        RETURN_IF_ERROR(zip->ReadRange(*e, off, n, buf.data()));
        crc = Crc32Sliced(buf.data(), n, crc);
        if (Digest::Of(buf.data(), n) != want) {
          return Status::Corruption(what + part + " does not match its stored digest");
        }
        return Status::OK();
      };
      if (r.inline_data() != nullptr) {
        RETURN_IF_ERROR(check(0, r.byte_length(), ToDigest(*r.digest()), ""));
      } else {
        const uint64_t cs = r.chunk_size();
        const auto* chunks = r.chunks();
        const uint64_t count = chunks ? chunks->size() : 0;
        for (uint64_t i = 0; i < count; ++i) {
          RETURN_IF_ERROR(Cancelled());
          const uint64_t off = i * cs;
          RETURN_IF_ERROR(check(off, std::min(cs, r.byte_length() - off),
                                ToDigest(*chunks->Get(static_cast<flatbuffers::uoffset_t>(i))),
                                " chunk " + std::to_string(i)));
        }
      }
      if (crc != e->crc32) return Status::Corruption(what + " fails its CRC-32");
    }
    return Status::OK();
  }

  static Digest ToDigest(const fb::Digest128& d) {
    Digest out;
    out.lo = d.lo();
    out.hi = d.hi();
    return out;
  }

  Result<std::unique_ptr<TempFile>> WriteText(const Job& job, ExportedFile* out) {
    ASSIGN_OR_RETURN(std::unique_ptr<TempFile> f, dir_->Create(job.rel));
    RETURN_IF_ERROR(f->Write(job.text.data(), job.text.size()));
    RETURN_IF_ERROR(f->SyncAndClose());
    const int fd = ::open(f->temp_path().c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
      return Status::IOError("re-opening '" + f->temp_path() + "': " + std::strerror(errno));
    std::string got(job.text.size() + 1, '\0');
    const ssize_t n = ::read(fd, got.data(), got.size());
    ::close(fd);
    if (n != static_cast<ssize_t>(job.text.size()) ||
        got.compare(0, job.text.size(), job.text) != 0) {
      return Status::Corruption("re-reading the written '" + job.rel + "': it differs");
    }
    out->path = job.rel;
    out->bytes = job.text.size();
    written_ += job.text.size();
    return f;
  }

  uint64_t written_ = 0;

 private:
  Store& store_;
  const TorchExportOptions& o_;
  ExportDir* dir_;
  uint64_t done_ = 0;
};

// Deletes the temporary universal tag when the export ends.
struct TempTag {
  Store* store = nullptr;
  std::string tag;
  ~TempTag() {
    if (store == nullptr || tag.empty()) return;
    Status deleted = store->DeleteTag(tag);
    if (!deleted.ok()) {
      spdlog::warn(
          "[ckptkv] the universal export's temporary tag '{}' is left in the store: {}; "
          "remove it with ckptkv rm",
          tag, deleted.ToString());
    }
  }
};

// Names of the temporary tags of universal exports: unique in the process
// (the store has one writing process), so two exports never share one.
std::string TemporaryTagName() {
  static std::atomic<uint64_t> next{0};
  return "ckptkv-export-universal-" + std::to_string(::getpid()) + "-" +
         std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count()) +
         "-" + std::to_string(next.fetch_add(1));
}

}  // namespace

Result<TorchExportReport> ExportTorch(Store& store, const std::string& tag_or_latest,
                                      const TorchExportOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  if (o.format != "pt" && o.format != "deepspeed" && o.format != "universal") {
    return Status::InvalidArgument("unknown export format '" + o.format +
                                   "'; valid: pt, deepspeed, universal, safetensors");
  }
  if (o.out_dir.empty())
    return Status::InvalidArgument("the output directory is required (--out DIR)");
  Result<TagInfo> found = store.GetTag(tag_or_latest);
  if (!found.ok() && found.status().IsNotFound() && tag_or_latest == "latest") {
    ASSIGN_OR_RETURN(std::optional<std::string> latest, store.Latest());
    if (latest) found = store.GetTag(*latest);
  }
  if (!found.ok()) return found.status();
  const TagInfo info = std::move(*found);
  const std::string& tag = info.tag;
  TorchExportReport report;
  report.tag = tag;
  report.format = o.format;
  report.out_dir = o.out_dir;

  std::vector<Job> jobs;
  TempTag temp_tag;
  if (o.format == "pt") {
    for (const auto& f : info.files) jobs.push_back({tag, f, f, ""});
  } else if (o.format == "deepspeed") {
    RETURN_IF_ERROR(ExportDir::CheckRelative(tag));
    for (const auto& f : info.files) jobs.push_back({tag, f, tag + "/" + f, ""});
    jobs.push_back({"", "", "latest", tag});
  } else {
    RETURN_IF_ERROR(ExportDir::CheckRelative(tag));
    ASSIGN_OR_RETURN(std::unique_ptr<TagIndex> index, TagIndex::Build(store, tag));
    ASSIGN_OR_RETURN(SourceInfo source, DescribeTag(store, *index));
    std::string from = tag;
    std::vector<std::string> files = info.files;
    if (!source.universal) {
      if (store.read_only()) {
        return Status::FailedPrecondition(
            "a universal export of tag '" + tag +
            "' converts it in the store first; open the store writable");
      }
      // Before the conversion (seconds, new blocks): an output that would
      // be refused anyway.
      if (!o.overwrite) {
        ASSIGN_OR_RETURN(std::unique_ptr<ExportDir> out, ExportDir::Open(o.out_dir));
        for (const std::string& rel : {tag, std::string("latest_universal")}) {
          ASSIGN_OR_RETURN(bool there, out->Exists(rel));
          if (there) {
            return Status::AlreadyExists("'" + o.out_dir + "' already holds " + rel +
                                         "; choose another directory, or use --overwrite to "
                                         "replace it");
          }
        }
      }
      // A name no tag has, committed or pending: only a tag this export
      // made is ever deleted.
      const std::string base = TemporaryTagName();
      from = base;
      for (int n = 1; store.GetTag(from).ok() || store.IsPending(from); ++n) {
        from = base + "-" + std::to_string(n);
      }
      WriteOptions write;
      write.set_latest = false;
      auto converted = ExportUniversal(store, tag, from, write);
      if (!converted.ok()) {
        if (store.GetTag(from).ok()) (void)store.DeleteTag(from);  // committed, then failed
        return converted.status().WithContext("converting tag '" + tag + "' to universal");
      }
      temp_tag.store = &store;
      temp_tag.tag = from;
      report.converted = true;
      ASSIGN_OR_RETURN(files, store.ListFiles(from));
    }
    for (const auto& f : files) jobs.push_back({from, f, tag + "/" + f, ""});
    jobs.push_back({"", "", "latest_universal", tag});
  }

  ASSIGN_OR_RETURN(std::unique_ptr<ExportDir> dir, ExportDir::Open(o.out_dir));
  std::vector<std::string> existing;
  for (const Job& j : jobs) {
    ASSIGN_OR_RETURN(bool there, dir->Exists(j.rel));
    if (there) existing.push_back(j.rel);
  }
  if (!existing.empty() && !o.overwrite) {
    std::string list;
    for (size_t i = 0; i < existing.size() && i < 5; ++i) list += (i ? ", " : "") + existing[i];
    if (existing.size() > 5) list += ", ... (" + std::to_string(existing.size()) + " in all)";
    return Status::AlreadyExists("'" + o.out_dir + "' already holds " + list +
                                 "; choose another directory, or use --overwrite to replace them");
  }

  Exporter ex(store, o, dir.get());
  for (const Job& j : jobs) {
    if (j.file.empty()) continue;
    ASSIGN_OR_RETURN(std::string tree_bytes, store.GetFileTree(j.store_tag, j.file));
    const fb::StateTree* t = VerifiedStateTree(tree_bytes);
    if (t != nullptr) ex.total_ += t->logical_bytes();
  }
  std::vector<std::unique_ptr<TempFile>> temps;
  Status st = [&]() -> Status {
    for (const Job& j : jobs) {
      ExportedFile out;
      Result<std::unique_ptr<TempFile>> f =
          j.file.empty() ? ex.WriteText(j, &out) : ex.WriteTorchFile(j, &out);
      if (!f.ok()) return f.status();
      temps.push_back(std::move(*f));
      report.tensors += out.tensors;
      report.tensor_bytes += j.file.empty() ? 0 : out.bytes;
      report.files.push_back(std::move(out));
    }
    // Everything is written and checked: into place, `latest` last.
    for (auto& f : temps) RETURN_IF_ERROR(dir->Commit(f.get(), o.overwrite));
    return Status::OK();
  }();
  if (!st.ok()) {
    temps.clear();  // removes the temporary files not yet renamed
    dir->RemoveCreatedDirs();
    return st;
  }
  report.bytes_written = ex.written_;
  report.replaced = std::move(existing);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

std::string TorchExportJson(const TorchExportReport& r, int indent) {
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  for (const auto& f : r.files) {
    files.push_back({{"path", f.path}, {"bytes", f.bytes}, {"tensors", f.tensors}});
  }
  nlohmann::ordered_json j{{"tag", r.tag},
                           {"format", r.format},
                           {"out", r.out_dir},
                           {"files", files},
                           {"tensors", r.tensors},
                           {"tensor_bytes", r.tensor_bytes},
                           {"bytes_written", r.bytes_written},
                           {"verified", true},
                           {"converted", r.converted},
                           {"replaced", r.replaced},
                           {"seconds", r.seconds}};
  return j.dump(indent, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace ckptkv::checkpoint
