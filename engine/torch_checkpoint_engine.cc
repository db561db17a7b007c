#include "engine/torch_checkpoint_engine.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <torch/serialize.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv {

namespace fs = std::filesystem;

namespace {

Status WriteFile(const std::string& path, const std::vector<char>& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError("cannot create '" + path + "': " + std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return Status::IOError("cannot write '" + path + "': " + std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0)
    return Status::IOError("cannot close '" + path + "': " + std::strerror(errno));
  return Status::OK();
}

Status SyncPath(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::IOError("cannot open '" + path + "' to sync: " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Status::IOError("fsync of '" + path + "' failed: " + std::strerror(err));
  return Status::OK();
}

c10::IValue MoveTensors(const c10::IValue& v, const c10::Device& device) {
  if (v.isTensor()) return v.toTensor().to(device);
  if (v.isList()) {
    auto list = v.toList();
    c10::impl::GenericList out(list.elementType());
    for (const auto& e : list) out.push_back(MoveTensors(e, device));
    return out;
  }
  if (v.isTuple()) {
    std::vector<c10::IValue> elems;
    for (const auto& e : v.toTupleRef().elements()) elems.push_back(MoveTensors(e, device));
    return c10::ivalue::Tuple::create(std::move(elems));
  }
  if (v.isGenericDict()) {
    auto dict = v.toGenericDict();
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& e : dict) out.insert(e.key(), MoveTensors(e.value(), device));
    return out;
  }
  return v;
}

std::string TagOfPath(const std::string& path) {
  return fs::path(path).lexically_normal().parent_path().filename().string();
}

}  // namespace

TorchCheckpointEngine::TorchCheckpointEngine(TorchEngineConfig config)
    : CheckpointEngine("TorchCheckpointEngine"), config_(config) {}

void TorchCheckpointEngine::create(const std::string& tag) {
  ThrowIfError(ValidateTag(tag));
  save_dirs_.emplace(tag, "");
  files_[tag].clear();
  spdlog::info("[Torch] Checkpoint {} is about to be saved!", tag);
}

void TorchCheckpointEngine::create(const std::string& save_dir, const std::string& tag) {
  create(tag);
  save_dirs_[tag] = save_dir;
}

void TorchCheckpointEngine::makedirs(const std::string& path, bool exist_ok) {
  std::error_code ec;
  if (!exist_ok && fs::exists(path, ec)) {
    ThrowIfError(Status::AlreadyExists("makedirs: '" + path + "' already exists"));
  }
  fs::create_directories(path, ec);
  if (ec) ThrowIfError(Status::IOError("makedirs: cannot create '" + path + "': " + ec.message()));
}

void TorchCheckpointEngine::save(const c10::IValue& state_dict, const std::string& path) {
  spdlog::info("[Torch] Saving {}...", path);
  std::vector<char> bytes;
  ThrowIfError(TorchCall(TorchErrorKind::kUserValue, "cannot serialize '" + path + "'", [&] {
    bytes = torch::pickle_save(state_dict);
    return Status::OK();
  }));
  ThrowIfError(WriteFile(path, bytes));
  files_[TagOfPath(path)].push_back(path);
  spdlog::info("[Torch] Saved {}.", path);
}

bool TorchCheckpointEngine::commit(const std::string& tag) {
  CommitInfo info;
  info.tag = tag;
  auto it = save_dirs_.find(tag);
  if (it != save_dirs_.end()) info.save_dir = it->second;
  return commit(info);
}

bool TorchCheckpointEngine::commit(const CommitInfo& info) {
  std::string save_dir = info.save_dir;
  if (save_dir.empty()) {
    auto it = save_dirs_.find(info.tag);
    if (it != save_dirs_.end()) save_dir = it->second;
  }
  if (config_.fsync) {
    for (const auto& f : files_[info.tag]) ThrowIfError(SyncPath(f, false));
    if (!save_dir.empty()) {
      std::string tag_dir = save_dir + "/" + info.tag;
      if (fs::exists(tag_dir)) ThrowIfError(SyncPath(tag_dir, true));
    }
  }
  if (info.save_latest && !save_dir.empty()) {
    // DeepSpeed writes `latest` after commit, without a newline.
    std::string latest = save_dir + "/latest";
    ThrowIfError(WriteFile(latest, std::vector<char>(info.tag.begin(), info.tag.end())));
    if (config_.fsync) {
      ThrowIfError(SyncPath(latest, false));
      ThrowIfError(SyncPath(save_dir, true));
    }
  }
  files_.erase(info.tag);
  save_dirs_.erase(info.tag);
  spdlog::info("[Torch] Checkpoint {} is ready now!", info.tag);
  return true;
}

std::optional<std::string> TorchCheckpointEngine::open(const std::string& load_dir,
                                                       const std::optional<std::string>& tag) {
  std::string chosen;
  if (!tag || tag->empty() || *tag == "latest") {
    std::ifstream in(load_dir + "/latest");
    if (!in) return std::nullopt;
    std::getline(in, chosen, '\0');
    while (!chosen.empty() && std::isspace(static_cast<unsigned char>(chosen.back())))
      chosen.pop_back();
  } else {
    chosen = *tag;
  }
  if (!fs::is_directory(load_dir + "/" + chosen)) {
    ThrowIfError(Status::NotFound("checkpoint '" + load_dir + "/" + chosen + "' does not exist"));
  }
  return chosen;
}

c10::IValue TorchCheckpointEngine::load(const std::string& path, MapLocation map_location) {
  std::ifstream in(path, std::ios::binary);
  if (!in) ThrowIfError(Status::NotFound("checkpoint file '" + path + "' does not exist"));
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ValueOrThrow(TorchCall(TorchErrorKind::kStoredValue, "cannot read '" + path + "'",
                                [&]() -> Result<c10::IValue> {
                                  c10::IValue v = torch::pickle_load(bytes);
                                  return map_location ? MoveTensors(v, *map_location) : v;
                                }));
}

void TorchCheckpointEngine::close(const std::string& tag) {}

}  // namespace ckptkv
