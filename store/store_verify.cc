// Verify: the store's one verifier. Per tag: the commit record and its
// counts and file list, every state tree, every tensor record, and every
// block they reference (re-hashed, with an index entry of the right
// length). A read-only view confirms its problems in a fresh view; repair
// drops the index entries of bad blocks (ForgetBlocks).
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>

#include <algorithm>
#include <map>
#include <set>
#include <unordered_set>

#include "store/names.h"
#include "store/record_check.h"
#include "store/record_codec.h"
#include "store/node_client.h"
#include "store/store_internal.h"

namespace ckptkv {

void Store::Impl::VerifyTag(const std::string& tag, VerifyReport* report, BlockVerdicts* checked,
                            const VerifyOptions& options) const {
  auto problem = [&](std::string file, std::string param, std::string digest, std::string what) {
    report->problems.push_back(
        VerifyProblem{tag, std::move(file), std::move(param), std::move(digest), std::move(what)});
  };
  auto info_or = FindTag(tag);
  if (!info_or.ok()) {
    problem("", "", "", info_or.status().ToString());
    return;
  }
  if (!info_or.value()) return;  // deleted by a writer since it was listed
  const TagInfo& info = **info_or;
  report->tags++;
  std::string prefix = TagPrefix(tag);
  std::string end = PrefixEnd(prefix);
  rocksdb::ReadOptions ro;
  rocksdb::Slice upper(end);
  ro.iterate_upper_bound = &upper;

  // Tensor records, by file: each must pass its checks.
  std::map<std::string, std::set<std::string>> params_of;
  uint64_t records = 0;
  std::vector<std::string> good_bytes;
  std::vector<std::pair<std::string, std::string>> good_names;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(ro, cf_.tensors));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    std::string_view parts[3];
    if (!SplitKey(it->key().ToStringView(), 3, parts)) {
      problem("", "", "", "malformed tensor key " + Quote(it->key().ToStringView()));
      continue;
    }
    std::string file(parts[1]), param(parts[2]);
    records++;
    report->tensors++;
    params_of[file].insert(param);
    const fb::TensorRecord* r = nullptr;
    std::string value = it->value().ToString();  // aligned for FlatBuffers
    Status s = VerifyTensorRecordBytes(value, "record", &r);
    if (!s.ok()) {
      problem(file, param, "", s.message());
      continue;
    }
    good_bytes.push_back(std::move(value));
    good_names.emplace_back(file, param);
  }
  if (!it->status().ok()) {
    problem("", "", "", "tensor records cannot be scanned: " + it->status().ToString());
    return;
  }
  it.reset();

  // Files: every file the commit record lists has a tree that decodes
  // within its limits, and every tensor node of it has a record.
  std::set<std::string> files_seen;
  std::unique_ptr<rocksdb::Iterator> fit(db_->NewIterator(ro, cf_.files));
  for (fit->Seek(prefix); fit->Valid(); fit->Next()) {
    std::string file = fit->key().ToString().substr(prefix.size());
    files_seen.insert(file);
    report->files++;
    const std::string bytes = fit->value().ToString();  // aligned for FlatBuffers
    std::vector<std::string> paths;
    Status ts = VerifyStateTreeBytes(bytes, "state tree", "state tree fails verification", &paths);
    if (!ts.ok()) {
      problem(file, "", "", ts.message());
      continue;
    }
    const std::set<std::string>& params = params_of[file];
    std::set<std::string> distinct(paths.begin(), paths.end());
    for (const auto& p : distinct) {
      if (!params.count(p)) problem(file, p, "", "state tree names a tensor that has no record");
    }
  }
  if (!fit->status().ok()) {
    problem("", "", "", "state trees cannot be scanned: " + fit->status().ToString());
  }
  fit.reset();
  for (const auto& f : info.files) {
    if (!files_seen.count(f)) problem(f, "", "", "file listed by the commit record is missing");
  }
  for (const auto& f : files_seen) {
    if (std::find(info.files.begin(), info.files.end(), f) == info.files.end()) {
      problem(f, "", "", "file is not listed by the commit record");
    }
  }
  for (const auto& [f, params] : params_of) {
    if (!files_seen.count(f)) problem(f, "", "", "tensor records of a file without a state tree");
  }
  if (records != info.tensors) {
    problem("", "", "",
            "commit record says " + std::to_string(info.tensors) + " tensors, the tag has " +
                std::to_string(records) + " records");
  }

  // Blocks: each referenced chunk decodes to its digest and is indexed.
  // Blocks not checked yet are checked on the read workers, a window at a
  // time (progress is reported from this thread after each window); the
  // problems are then listed in record and chunk order.
  struct Pending {
    Digest d;
    uint64_t length;
  };
  std::vector<Pending> todo;
  std::unordered_set<Digest, DigestHash> queued;
  for (const std::string& bytes : good_bytes) {
    const fb::TensorRecord* r = flatbuffers::GetRoot<fb::TensorRecord>(bytes.data());
    if (!r->chunks()) continue;  // inline: checked with the record
    const uint64_t cs = r->chunk_size();
    for (size_t i = 0; i < r->chunks()->size(); ++i) {
      Digest d = FromFb(*r->chunks()->Get(i));
      if (checked->count(d) || !queued.insert(d).second) continue;
      todo.push_back(Pending{d, std::min<uint64_t>(cs, r->byte_length() - i * cs)});
    }
  }
  ThreadPool& pool = ReadPool();
  BufferPool buffers;
  const size_t window = std::max<size_t>(64, pool.size() * 4);
  std::vector<BlockVerdict> verdicts;
  for (size_t start = 0; start < todo.size(); start += window) {
    const size_t m = std::min(window, todo.size() - start);
    verdicts.assign(m, BlockVerdict{});
    pool.ParallelFor(m, [&](size_t k) {
      verdicts[k] = CheckBlock(todo[start + k].d, todo[start + k].length, &buffers);
    });
    for (size_t k = 0; k < m; ++k) {
      const Pending& p = todo[start + k];
      if (verdicts[k].read) {
        report->blocks_checked++;
        report->bytes_checked += p.length;
      }
      if (options.progress) options.progress(p.length);
      checked->emplace(p.d, std::move(verdicts[k]));
    }
  }
  for (size_t k = 0; k < good_bytes.size(); ++k) {
    const fb::TensorRecord* r = flatbuffers::GetRoot<fb::TensorRecord>(good_bytes[k].data());
    const auto& [file, param] = good_names[k];
    if (!r->chunks()) continue;
    for (size_t i = 0; i < r->chunks()->size(); ++i) {
      Digest d = FromFb(*r->chunks()->Get(i));
      const BlockVerdict& v = checked->at(d);
      if (!v.what.empty()) {
        problem(file, param, d.Hex(), v.what + " (chunk " + std::to_string(i) + ")");
        report->damaged_tags.insert(tag);
      }
    }
  }
  if (!report->problems.empty() && report->problems.back().tag == tag) {
    report->damaged_tags.insert(tag);
  }
}

Store::Impl::BlockVerdict Store::Impl::CheckBlock(const Digest& d, uint64_t len,
                                                  BufferPool* buffers) const {
  BlockVerdict v;
  std::unique_ptr<ReadBuffers> b = buffers->Take();
  rocksdb::Status rs = GetBlock(d, &b->value);
  std::string idx;
  rocksdb::Status is = db_->Get(rocksdb::ReadOptions(), cf_.index, d.Key(), &idx);
  uint32_t raw = 0, stored = 0;
  if (rs.IsNotFound()) {
    v.what = "block is missing";
    v.bad = true;
  } else if (!rs.ok()) {
    v.what = "block cannot be read: " + rs.ToString();
    v.bad = true;
  } else {
    v.read = true;
    // The length comes from a checked record (at most 256 MiB); the
    // block's header is checked against it before anything is decoded.
    b->scratch.resize(len);
    Status ds = DecodeBlock(b->value.ToStringView(), b->scratch.data(), len, &b->grouped);
    if (!ds.ok()) {
      v.what = ds.message();
      v.bad = true;
    } else if (Digest::Of(b->scratch.data(), len) != d) {
      v.what = "block bytes do not match their digest";
      v.bad = true;
    }
  }
  if (!v.bad) {
    if (is.IsNotFound()) {
      v.what = "block has no index entry";
    } else if (!is.ok()) {
      v.what = "index entry cannot be read: " + is.ToString();
    } else if (!DecodeIndexValue(idx, &raw, &stored) || raw != len) {
      v.what = "index entry is malformed or names another length";
    }
  }
  v.indexed = is.ok();
  buffers->Give(std::move(b));
  return v;
}

Result<VerifyReport> Store::Verify(const std::optional<std::string>& tag) const {
  VerifyOptions o;
  o.tag = tag;
  return Verify(o);
}

Result<VerifyReport> Store::Verify(const VerifyOptions& options) const {
  if (impl_->node_) {
    if (options.repair) {
      return Status::NotSupported(
          "verify --repair of store '" + impl_->dir_ +
          "' while its node writer holds it; repair when the job has ended");
    }
    RETURN_IF_ERROR(impl_->node_->RefreshView());
    ASSIGN_OR_RETURN(std::shared_ptr<Store> view, impl_->node_->View());
    return view->Verify(options);
  }
  if (options.repair) RETURN_IF_ERROR(impl_->WritableCheck("verify --repair"));
  VerifyReport report;
  Impl::BlockVerdicts checked;
  std::vector<std::string> names;
  if (options.tag) {
    RETURN_IF_ERROR(GetTag(*options.tag).status());
    names.push_back(*options.tag);
  } else {
    std::unique_ptr<rocksdb::Iterator> it(
        impl_->db_->NewIterator(rocksdb::ReadOptions(), impl_->cf_.tags));
    for (it->SeekToFirst(); it->Valid(); it->Next()) names.push_back(it->key().ToString());
    RETURN_IF_ERROR(FromRocks(it->status(), "listing the tags of store '" + dir() + "'"));
  }
  for (const auto& t : names) impl_->VerifyTag(t, &report, &checked, options);
  if (!report.ok() && read_only()) {
    // A read-only view beside a live writer is not consistent (see
    // ReadTensorRange): a problem counts only if a fresh view of the
    // damaged tags shows it too.
    ASSIGN_OR_RETURN(auto fresh, impl_->FreshView());
    VerifyReport confirmed;
    Impl::BlockVerdicts again;
    VerifyOptions quiet = options;
    quiet.progress = nullptr;
    for (const auto& t : report.damaged_tags) fresh->impl_->VerifyTag(t, &confirmed, &again, quiet);
    std::vector<VerifyProblem> kept;
    for (auto& p : report.problems) {
      if (!report.damaged_tags.count(p.tag)) kept.push_back(std::move(p));
    }
    for (auto& p : confirmed.problems) kept.push_back(std::move(p));
    report.problems = std::move(kept);
    report.damaged_tags = confirmed.damaged_tags;
  }
  if (options.repair) {
    std::vector<Digest> bad;
    for (const auto& [d, v] : checked) {
      if (v.bad && v.indexed) bad.push_back(d);
    }
    RETURN_IF_ERROR(impl_->ForgetBlocks(bad));
    report.blocks_forgotten = bad.size();
  }
  return report;
}

}  // namespace ckptkv
