# `cmake --install`: the programs, the libraries, their public headers and a
# CMake package, so another project can
#   find_package(ckptkv REQUIRED)
#   target_link_libraries(app PRIVATE ckptkv::engine)
# Exported targets (each also an alias in this tree):
#   ckptkv::schema ckptkv::store           torch-free
#   ckptkv::checkpoint_core                torch-free
#   ckptkv::engine ckptkv::query ckptkv::deepspeed   LibTorch
include(CMakePackageConfigHelpers)

set(CKPTKV_EXPORTED
  ckptkv_schema:schema
  ckptkv_store:store
  ckptkv_engine:engine
  ckptkv_checkpoint_core:checkpoint_core
  ckptkv_deepspeed:deepspeed
  ckptkv_query:query)
set(CKPTKV_EXPORTED_TARGETS)
foreach(pair IN LISTS CKPTKV_EXPORTED)
  string(REPLACE ":" ";" pair "${pair}")
  list(GET pair 0 target)
  list(GET pair 1 name)
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name})
  add_library(ckptkv::${name} ALIAS ${target})
  list(APPEND CKPTKV_EXPORTED_TARGETS ${target})
endforeach()

install(TARGETS ${CKPTKV_EXPORTED_TARGETS}
  EXPORT ckptkvTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
foreach(dir schema store engine checkpoint)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${dir}/
    DESTINATION ${CKPTKV_INSTALL_INCLUDEDIR}/${dir}
    FILES_MATCHING PATTERN "*.h" PATTERN "*_internal.h" EXCLUDE)
endforeach()
foreach(program ckptkv ckptkvd kv-browser)
  if(TARGET ${program})
    install(TARGETS ${program} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
endforeach()

set(CKPTKV_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/ckptkv)
install(EXPORT ckptkvTargets NAMESPACE ckptkv:: DESTINATION ${CKPTKV_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ckptkvConfig.cmake.in
  ${PROJECT_BINARY_DIR}/ckptkvConfig.cmake INSTALL_DESTINATION ${CKPTKV_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/ckptkvConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/ckptkvConfig.cmake
  ${PROJECT_BINARY_DIR}/ckptkvConfigVersion.cmake DESTINATION ${CKPTKV_CMAKE_DIR})
