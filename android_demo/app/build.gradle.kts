plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.alignkd.demo"
    compileSdk = 34

    defaultConfig {
        applicationId = "org.alignkd.demo"
        minSdk = 26
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            // the ExecuTorch AAR ships these two ABIs
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            // a demo: sign release builds with the debug key so `assembleRelease` installs too
            signingConfig = signingConfigs.getByName("debug")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        jniLibs {
            useLegacyPackaging = true
        }
    }
}

val executorchVersion: String = (findProperty("executorchVersion") as String?) ?: "1.5.1"
val executorchAar: String? = findProperty("executorchAar") as String?

dependencies {
    implementation(project(":core"))
    if (executorchAar != null) {
        // a locally built AAR brings no POM: add what the published one depends on
        implementation(files(executorchAar))
        implementation("com.facebook.fbjni:fbjni:0.5.1")
        implementation("com.facebook.soloader:nativeloader:0.10.5")
    } else {
        implementation("org.pytorch:executorch-android:$executorchVersion")
    }
    implementation("androidx.core:core-ktx:1.13.1")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.1")
}
